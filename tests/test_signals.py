"""Logits and hidden-state signals: the store, adding them later, the KL/hidden losses and recipes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from drivekd.cli.cache import main as cache_cli
from drivekd.data import load_samples
from drivekd.errors import AlignmentError, ConfigError, StoreError
from drivekd.families import Family, load_model
from drivekd.losses.hidden import hidden_mse
from drivekd.losses.kl import student_buckets, topk_kl
from drivekd.teacher.build import BuildConfig, build
from drivekd.store.signals import answer_rows, parse_signals
from drivekd.store import TeacherStore
from drivekd.trainer.checkpoint import list_checkpoints, load_state
from drivekd.trainer.loop import train
from drivekd.trainer.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROLES2 = ("perception", "planning")


def _cfg(tiny_models, data, out, **kw):
    t = tiny_models / "internvl-teacher"
    return BuildConfig(teachers={r: t for r in ROLES2}, data=data, images=None, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def full_store(tiny_models, small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "cache"
    res = build(_cfg(tiny_models, small_data, out, signals=("hidden", "logits", "attention"), logits_top_k=16))
    assert res["written"] == 5
    return out


@pytest.fixture(scope="module")
def attn_store(tiny_models, small_data, tmp_path_factory) -> Path:
    """The same two roles with attention only (read here; a test that adds to it works on a copy)."""
    out = tmp_path_factory.mktemp("attn") / "cache"
    build(_cfg(tiny_models, small_data, out))
    return out


def _attention_files(store: Path) -> dict[str, tuple]:
    """Every attention-side file (maps, vectors, shared prefixes): bytes, inode and mtime."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store)
        if not p.is_file() or not ({"samples", "prefixes"} & set(rel.parts)):
            continue
        if any(part.startswith(("logits_", "hidden")) for part in rel.parts):
            continue
        if p.name == "zarr.json" and p.parent.parent.name == "samples":
            continue  # the sample's mark: adding a signal adds its entry there (one write)
        st = p.stat()
        out[str(rel)] = (p.read_bytes(), st.st_ino, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- the store


def test_parse_signals_is_order_free_and_keeps_attention():
    assert parse_signals("logits,attention") == parse_signals("attention,logits") == ("attention", "logits")
    assert parse_signals("hidden") == ("attention", "hidden")
    with pytest.raises(ConfigError, match="--signals: unknown signal"):
        parse_signals("attention,logit")


def test_stored_signals_equal_a_direct_forward(tiny_models, small_data, full_store):
    """Shared-prefix groups and single samples: the stored top-k, tail and hidden states are the
    teacher's own (an unshared full forward), within fp16 storage."""
    st = TeacherStore(full_store)
    meta = st.role_meta("planning")["signals"]
    assert meta["logits"]["top_k"] == 16 and meta["hidden"]["layers"] == [4] and meta["hidden"]["hidden_size"] == 96
    assert st.role_meta("perception")["signals"]["hidden"]["layers"] == [0]
    t = tiny_models / "internvl-teacher"
    fam = Family.from_pretrained(t)
    model = load_model(t).eval()
    samples = load_samples(small_data)
    assert any(st._mark(st._sample_dir("planning", s.id)).get("prefix") for s in samples)  # the shared path is covered
    for s in samples:
        inputs = fam.build_inputs([s])
        lay = inputs.layouts[0]
        with torch.no_grad():
            out = model(**inputs.tensors, output_hidden_states=True)
        lp = torch.log_softmax(out.logits[0].float(), -1)  # (T, V)
        got = st.get("planning", s.id, [], {"logits": None, "hidden": None})
        rows = answer_rows(lay.labels)
        assert torch.equal(got.logits.positions, rows)
        want = lp[rows]  # (A, V)
        torch.testing.assert_close(want.gather(-1, got.logits.index), got.logits.logprobs, atol=2e-3, rtol=2e-3)
        # They are the top 16 among the tokenizer's ids (the tiny LM head has padding rows beyond
        # them, which go to the tail); fp16 steps are 2^-8 at |lp| in 4..8.
        n_tok = meta["logits"]["tokenizer_size"]
        assert n_tok < 320 and (got.logits.index < n_tok).all()
        kth = want[:, :n_tok].topk(16, -1).values[:, -1:]
        assert (got.logits.logprobs >= kth - 5e-3).all()
        rest = want.scatter(-1, got.logits.index, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(got.logits.log_tail, rest, atol=1e-4, rtol=1e-4)
        x = lay.text.nonzero().squeeze(-1)
        assert torch.equal(got.hidden.positions, x)
        torch.testing.assert_close(got.hidden.layers[4], out.hidden_states[5][0, x], atol=2e-2, rtol=2e-3)
    assert st.verify("planning") == [] and st.verify("perception") == []


@pytest.mark.slow
def test_add_hidden_to_attention_store_computes_only_what_is_missing(tiny_models, small_data, full_store, attn_store, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(attn_store, out)
    before = _attention_files(out)
    assert before and not list(out.rglob("hidden"))
    # A build killed while writing hidden states, then the same command again: the attention
    # files are never rewritten (same bytes, same inode, same mtime) and the result equals a
    # store built with hidden from the start.
    # One writer thread: samples are written in order, so the kill point is deterministic.
    cmd = [sys.executable, "-m", "drivekd.cli.cache", "build", "--teacher", "planning", "--model", str(tiny_models / "internvl-teacher"),
           "--data", str(small_data), "--out", str(out), "--signals", "hidden", "--no-progress", "--device", "cpu", "--writers", "1"]
    r = subprocess.run(cmd, env={**os.environ, "DRIVEKD_FAULT_KILL_AFTER": "2"}, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    st = TeacherStore(out)
    assert 0 < sum(st.signal_status("planning", s, "hidden") == "complete" for s in st.role_meta("planning")["sample_ids"]) < 5
    res = CliRunner().invoke(cache_cli, cmd[3:])  # the same command, in this process
    assert res.exit_code == 0, res.output
    assert _attention_files(out) == before
    full = TeacherStore(full_store)
    for sid in st.role_meta("planning")["sample_ids"]:
        a = st.get("planning", sid, [], {"hidden": None}).hidden
        b = full.get("planning", sid, [], {"hidden": None}).hidden
        assert torch.equal(a.positions, b.positions) and torch.equal(a.layers[4], b.layers[4])
    assert "perception" not in json.dumps(TeacherStore(out).role_meta("perception").get("signals", {}))  # other roles untouched
    res = CliRunner().invoke(cache_cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    info = CliRunner().invoke(cache_cli, ["info", str(out)]).output
    assert "hidden: layers [4] on text positions" in info and info.count("hidden:") == 1
    # Nothing is missing any more: the next build runs no teacher forward.
    res = CliRunner().invoke(cache_cli, cmd[3:])
    assert res.exit_code == 0 and "0 samples written, 5 already complete" in res.output, res.output


def test_damaged_logits_chunk_detected(full_store, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(full_store, out)
    st = TeacherStore(out)
    sid = st.role_meta("planning")["sample_ids"][3]
    f = out / "planning" / "samples" / sid / "logits_lp" / "c" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=f"logits targets of sample '{sid}'.*logits_lp"):
        TeacherStore(out).get("planning", sid, [], {"logits": None})
    res = CliRunner().invoke(cache_cli, ["verify", str(out)])
    assert res.exit_code == 1 and f"planning/{sid}: logits unreadable" in res.output
    # A deleted hidden chunk: a file check finds it without reading.
    (out / "planning" / "samples" / sid / "hidden" / "c" / "0" / "0" / "0").unlink()
    res = CliRunner().invoke(cache_cli, ["verify", "--quick", str(out)])
    assert res.exit_code == 1 and "hidden marked complete but 1 file(s) are missing" in res.output
    # --repair removes the sample; the same build recomputes it with every signal the role lists.
    assert CliRunner().invoke(cache_cli, ["verify", "--repair", str(out)]).exit_code == 1
    assert TeacherStore(out).sample_status("planning", sid) == "missing"


def test_hidden_beyond_fp16_is_stored_as_fp32(full_store, tmp_path):
    from drivekd.store.signals import hidden_dtype

    out = tmp_path / "cache"
    shutil.copytree(full_store, out)
    st = TeacherStore(out, mode="a")
    sid = st.role_meta("planning")["sample_ids"][0]
    old = st.get("planning", sid, [], {"hidden": None}).hidden
    h = old.layers[4].clone()[None]
    h[0, 0, 0] = 1e5  # a massive activation
    assert hidden_dtype(h) == torch.float32 and hidden_dtype(old.layers[4]) == torch.float16
    st.write_signals("planning", sid, {"hidden": {"hidden_pos": old.positions.to(torch.int32).numpy(), "hidden": h.numpy(), "layers": [4]}})
    got = TeacherStore(out).get("planning", sid, [], {"hidden": None}).hidden.layers[4]
    assert torch.equal(got, h[0]) and TeacherStore(out).verify("planning") == []


def test_other_top_k_refused(tiny_models, small_data, full_store, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(full_store, out)
    with pytest.raises(StoreError, match="stores logits with other settings .*top_k: store has 16, this build 32"):
        build(_cfg(tiny_models, small_data, out, signals=("logits",), logits_top_k=32))
    # --overwrite recomputes that signal only, with the new k; attention and hidden stay.
    before = _attention_files(out)
    hidden = {p: p.stat().st_mtime_ns for p in out.rglob("hidden/c/*/0/0")}
    res = build(_cfg(tiny_models, small_data, out, signals=("logits",), logits_top_k=32, overwrite=True))
    assert res["written"] == 5
    st = TeacherStore(out)
    sid = st.role_meta("planning")["sample_ids"][0]
    assert st.get("planning", sid, [], {"logits": None}).logits.index.shape[-1] == 32
    assert _attention_files(out) == before and hidden == {p: p.stat().st_mtime_ns for p in out.rglob("hidden/c/*/0/0")}


# ----------------------------------------------------------------------------- the losses


def _bucket_kl_reference(p_t: np.ndarray, z_s: np.ndarray, k: int, tau: float) -> float:
    """Textbook: coarsen both distributions to (top-k of the teacher, the rest), soften each
    bucket vector as softmax(log p / tau), KL, times tau^2."""
    top = np.argsort(-p_t)[:k]
    rest = np.setdiff1d(np.arange(p_t.size), top)
    p_s = np.exp(z_s - z_s.max())
    p_s /= p_s.sum()
    bt = np.append(p_t[top], p_t[rest].sum())
    bs = np.append(p_s[top], p_s[rest].sum())
    soft = lambda b: np.exp(np.log(b) / tau) / np.exp(np.log(b) / tau).sum()  # noqa: E731
    qt, qs = soft(bt), soft(bs)
    return float(tau * tau * (qt * np.log(qt / qs)).sum())


def _stored(p_t: torch.Tensor, k: int):
    lp = p_t.log()
    top, idx = lp.topk(k, -1)
    tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return top, idx, tail


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_topk_kl_equals_reference_formula(tau):
    p_t = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.06, 0.04], [0.04, 0.06, 0.6, 0.11, 0.1, 0.09]], dtype=torch.float64)  # no ties: one top-k
    z_s = torch.tensor([[1.0, 0.3, -0.2, 0.5, 0.0, -1.0], [0.2, 0.1, 2.0, -0.5, 0.3, 0.0]], dtype=torch.float64)
    k = 2
    top, idx, tail = _stored(p_t, k)
    got = topk_kl(z_s[None], top[None], idx[None], tail[None], torch.ones(1, 2, dtype=torch.bool), tau)
    want = np.mean([_bucket_kl_reference(p_t[i].numpy(), z_s[i].numpy(), k, tau) for i in range(2)])
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-5)
    # The student's tail bucket is its exact mass outside the teacher's ids.
    b = student_buckets(z_s[None], idx[None])[0, 0].exp()
    ps = torch.softmax(z_s[0], -1)
    assert b[-1].item() == pytest.approx(1 - ps[idx[0]].sum().item(), rel=1e-6)


def test_topk_kl_properties():
    torch.manual_seed(0)
    z_t = torch.randn(1, 3, 10, dtype=torch.float64) * 2
    p_t = torch.softmax(z_t, -1)
    mask = torch.tensor([[True, True, False]])
    # Zero for a student equal to the teacher; the padding position (mask False) never counts.
    top, idx, tail = _stored(p_t, 4)
    assert topk_kl(z_t, top, idx, tail, mask, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    z_s = torch.randn(1, 3, 10, dtype=torch.float64)
    full = (p_t * (p_t.log() - torch.log_softmax(z_s, -1))).sum(-1)[0, :2].mean().item()
    # k = V: the tail is empty (-inf) and the bucket KL is the full KL, without NaN.
    top, idx, tail = _stored(p_t, 10)
    assert torch.isinf(tail).all()
    assert topk_kl(z_s, top, idx, tail, mask, 1.0).item() == pytest.approx(full, rel=1e-9)
    # Coarser buckets lose information: at tau = 1 the top-k KL is a lower bound of the full one.
    for k in (1, 3, 6):
        top, idx, tail = _stored(p_t, k)
        assert topk_kl(z_s, top, idx, tail, mask, 1.0).item() <= full + 1e-12
    # A row whose stored log-probs were rounded (fp16) is renormalised, not trusted to sum to 1.
    top, idx, tail = _stored(p_t, 4)
    rounded = topk_kl(z_s, top.half().double(), idx, tail, mask, 1.0).item()
    assert rounded == pytest.approx(topk_kl(z_s, top, idx, tail, mask, 1.0).item(), rel=1e-2)


def test_hidden_mse_is_masked_mean_squared_error():
    s = torch.zeros(2, 3, 4)
    t = torch.ones(2, 3, 4)
    t[0, 2] = 5.0
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert hidden_mse(s, t, mask).tolist() == [1.0, 0.0]
    mask[0, 2] = True
    assert hidden_mse(s, t, mask)[0].item() == pytest.approx((1 + 1 + 25) / 3)


# ----------------------------------------------------------------------------- the recipes


def _train_cfg(tiny_models, data, store, out, **kw):
    base = dict(student=tiny_models / "internvl-student", data=data, out=out, cache=store, num_workers=0, progress=False, max_steps=2,
                grad_accum=1, micro_batch=1, save_every=0, warmup_ratio=0.0, lr=1e-3, report_to="none")
    base.update(kw)
    return TrainConfig(**base)


def test_kl_run_trains_the_student_from_the_kl_alone(tiny_models, small_data, full_store, tmp_path):
    start = load_file(str(tiny_models / "internvl-student" / "model.safetensors"))
    res = train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "kl", recipe="kl", w_ce=0.0, max_steps=2, projection="none",
                           dynamic_weights=False, micro_batch=2))
    assert res.plan.row_names == ["ce", "kl"] and res.plan.terms[0].role == "perception"
    kl = [m["loss_kl"] for m in res.metrics]
    assert all(v > 0 for v in kl)
    end = load_file(str(tmp_path / "kl" / "final" / "model.safetensors"))
    moved = [k for k in end if not torch.equal(start[k], end[k])]
    assert any("language_model" in k for k in moved)  # only the KL term had weight: its gradient moved the student
    # The temperature enters the loss: another tau, another value on the same first batch.
    other = train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "kl-t2", recipe="kl", w_ce=0.0, max_steps=1, kl_temperature=2.0,
                             projection="none", dynamic_weights=False, micro_batch=2))
    assert other.metrics[0]["loss_kl"] != pytest.approx(kl[0], rel=1e-3)


HIDDEN_KW = dict(recipe="hidden", layers="L-2", max_steps=4, save_every=2, dynamic_weights=True, projection="agp")


@pytest.fixture(scope="module")
def hidden_run(tiny_models, small_data, full_store, tmp_path_factory, one_thread):
    """A --recipe hidden run of 4 steps, checkpoints at steps 2 and 4 (read only: copy before editing)."""
    out = tmp_path_factory.mktemp("hidden") / "full"
    return train(_train_cfg(tiny_models, small_data, full_store, out, **HIDDEN_KW))


def test_hidden_run_resumes_with_its_projection_and_final_is_the_plain_student(tiny_models, small_data, full_store, hidden_run,
                                                                                 tmp_path):
    full = hidden_run
    assert full.plan.row_names == ["ce", "hidden"] and full.plan.terms[0].pairs == ((2, (4,)),)  # L-2 of 4 and of 6 layers
    assert full.plan.terms[0].role == "planning"  # the role storing layer L-2 of the teacher
    steps = list_checkpoints(full.run)
    state = load_state(steps[0][1])
    w = state["projection"]["maps.2.weight"]
    assert w.shape == (96, 64)  # student width 64 -> teacher width 96
    assert not torch.equal(w, load_state(steps[1][1])["projection"]["maps.2.weight"])  # trained by the optimizer
    resumed = train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "resumed", resume_from=steps[0][1], **HIDDEN_KW))
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6, abs=0)
    assert [m["loss_hidden"] for m in resumed.metrics] == pytest.approx([m["loss_hidden"] for m in full.metrics[2:]], rel=1e-6)
    final = full.run / "final"
    keys = set(load_file(str(final / "model.safetensors")))
    assert keys == set(load_file(str(tiny_models / "internvl-student" / "model.safetensors")))
    assert not (final / "trainer_state.pt").exists()  # final/ keeps no trainer state (projection maps included)
    model = load_model(final)  # the plain student class, every weight expected
    assert type(model).__name__ == "InternVLForConditionalGeneration"


def test_resume_uses_the_saved_projection(tiny_models, small_data, full_store, hidden_run, tmp_path):
    """The resume test above fails if the projection is not restored: a zeroed projection gives
    another step-3 loss."""
    run = tmp_path / "full"
    shutil.copytree(hidden_run.run, run)
    ck = list_checkpoints(run)[0][1]
    state = load_state(ck)
    state["projection"] = {k: torch.zeros_like(v) for k, v in state["projection"].items()}
    torch.save(state, ck / "trainer_state.pt")
    res = train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "resumed", resume_from=ck, **HIDDEN_KW))
    assert res.metrics[0]["loss_hidden"] != pytest.approx(hidden_run.metrics[2]["loss_hidden"], rel=1e-3)


def _student_copy(tiny_models, tmp_path, edit):
    d = tmp_path / "student"
    shutil.copytree(tiny_models / "internvl-student", d)
    edit(d)
    return d


def _small_head(d):
    c = json.loads((d / "config.json").read_text())
    c["text_config"]["vocab_size"] = 200
    (d / "config.json").write_text(json.dumps(c))


def _other_tokenizer(d):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<extra_token_a>"])
    tok.save_pretrained(d)


@pytest.mark.parametrize("edit,match", [(_small_head, "LM head has 200 rows"), (_other_tokenizer, "vocabulary .* is not --student's")])
def test_vocabulary_mismatch_refused_before_any_model_loads(tiny_models, small_data, full_store, tmp_path, monkeypatch, edit, match):
    student = _student_copy(tiny_models, tmp_path, edit)
    import drivekd.trainer.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(AlignmentError, match=match):
        train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "run", recipe="kl", student=student))


def test_recipes_name_the_missing_signal(tiny_models, small_data, full_store, attn_store, tmp_path):
    attn_only = attn_store
    with pytest.raises(ConfigError, match="--recipe kl reads the teacher's logits.*--signals logits"):
        train(_train_cfg(tiny_models, small_data, attn_only, tmp_path / "a", recipe="kl"))
    with pytest.raises(ConfigError, match="teacher hidden states of layers \\[2\\].*--signals hidden"):
        train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "b", recipe="hidden", layers="2", teacher_role="planning"))
    with pytest.raises(ConfigError, match="--signal and --loss choose the attention terms"):
        TrainConfig(recipe="kl", loss="cosine")
    # --split applies to the baselines as to sft.
    res = train(_train_cfg(tiny_models, small_data, full_store, tmp_path / "c", recipe="hidden", split="perception", max_steps=1))
    assert {s.capability for s in res.plan.samples} == {"perception"}


@pytest.mark.parametrize("recipe", ["kl", "hidden"])
def test_dry_run_does_not_crash(tiny_models, recipe):
    from drivekd.planner import plan as P

    r = P.dry_run(TrainConfig(student=tiny_models / "internvl-student", recipe=recipe, dtype="float32"), seq_len=1024, suggest=False)
    assert r["peak_bytes"] > 0 and "counted as CE only" in P.format_report(r)
