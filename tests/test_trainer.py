"""The training loop on tiny models: resume, recipes x projections, losses fall, alignment, NaNs."""

import contextlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drivekd.data.loaders import load_samples
from drivekd.errors import AlignmentError, DriveKDError
from drivekd.families import Family, load_model
from drivekd.store.memory import InMemoryTargets
from drivekd.store.targets import SampleTargets
from drivekd.trainer.checkpoint import is_complete, list_checkpoints, load_state, read_meta
from drivekd.trainer.settings import TrainConfig
from drivekd.trainer.loop import train
from online_targets import TEACHER_LAYERS, compute_targets



pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tiny_models, demo_data, out, **kw):
    base = dict(
        student=tiny_models / "internvl-student", data=demo_data / "train.json", out=out, num_workers=0, progress=False,
        max_steps=2, grad_accum=1, micro_batch=1, save_every=0, dynamic_weights=False, warmup_ratio=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_resume_continues_exactly(tiny_models, demo_data, targets, tmp_path):
    """Run 2 steps with a checkpoint every step; resuming from step 1 gives step 2 exactly (one step
    before the resume point and one after: what a longer run would repeat step by step)."""
    kw = dict(max_steps=2, save_every=1, grad_accum=2, micro_batch=1, lr=1e-3, dynamic_weights=True)
    full = train(_cfg(tiny_models, demo_data, tmp_path / "full", num_workers=1, **kw), targets)
    assert len(full.losses) == 2 and all(math.isfinite(l) for l in full.losses)
    steps = [s for s, _ in list_checkpoints(tmp_path / "full")]
    assert steps == [1, 2]
    for _, p in list_checkpoints(tmp_path / "full"):
        assert is_complete(p) and read_meta(p)["config"]["recipe"] == "multi"
        state = load_state(p)  # weights_only=True
        assert {"optimizer", "scheduler", "rng", "reweight"} <= set(state)
    assert not list((tmp_path / "full").glob(".tmp-*"))
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("loss", "loss_ce", "loss_perception", "raw_reasoning", "weights", "lr", "grad_norms", "grad_cos",
                "projections_fired", "samples_per_s", "tokens_per_s", "peak_mem_bytes"):
        assert key in lines[-1], key

    resumed = train(_cfg(tiny_models, demo_data, tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000001", **kw), targets)
    assert resumed.steps == 2
    assert resumed.losses == pytest.approx(full.losses[1:], rel=1e-6, abs=0)
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "resumed" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # The dynamic weights moved (step 2 ran with weights updated after step 1), and the resumed run continued them.
    assert full.metrics[-1]["weights"] != {"ce": 1.0, "perception": 1.0, "reasoning": 1.0, "planning": 1.0}
    assert resumed.metrics[-1]["weights"] == pytest.approx(full.metrics[-1]["weights"], rel=1e-6)

    # final/ loads as an ordinary checkpoint.
    fam = Family.from_pretrained(tmp_path / "full" / "final")
    model = load_model(tmp_path / "full" / "final")
    inputs = fam.build_inputs(load_samples(demo_data / "train.json")[:1])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs.tensors).logits).all()

    # --resume on a run folder picks its latest complete checkpoint; a half-written one is ignored.
    (tmp_path / "full" / "step-000006").mkdir()
    again = train(_cfg(tiny_models, demo_data, tmp_path / "full", resume=True, **kw), targets)
    assert again.steps == 2 and again.losses == []
    assert not (tmp_path / "full" / "step-000006").exists()


ROLES_OF = {"perception": ["ce", "perception"], "reasoning": ["ce", "reasoning"], "planning": ["ce", "planning"],
            "multi": ["ce", "perception", "reasoning", "planning"]}


@pytest.mark.parametrize("recipe", ["perception", "reasoning", "planning", "multi"])
@pytest.mark.parametrize("projection", ["agp", "g1", "g2", "none"])
def test_every_recipe_and_projection(tiny_models, demo_data, targets, tmp_path, recipe, projection):
    dynamic = projection in ("agp", "g2")
    res = train(_cfg(tiny_models, demo_data, tmp_path / "run", recipe=recipe, projection=projection, max_steps=1,
                     dynamic_weights=dynamic, micro_batch=2 if recipe == "multi" else 1), targets)
    rec = res.metrics[-1]
    assert res.plan.row_names == ROLES_OF[recipe]
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    for name in ROLES_OF[recipe]:
        assert math.isfinite(rec[f"loss_{name}"])
    if projection == "none" and not dynamic:
        assert rec["grad_norms"] is None  # fast path: one backward of the weighted sum
    else:
        assert all(v is not None and v > 0 for v in rec["grad_norms"].values())
    assert is_complete(tmp_path / "run" / "final")


@pytest.mark.slow
def test_losses_fall(tiny_models, demo_data, targets, tmp_path):
    """CE and every attention term decrease over a short run (4 samples, 4 epochs, higher lr)."""
    sub = tmp_path / "data.json"
    records = json.loads((demo_data / "train.json").read_text())[:6:2] + json.loads((demo_data / "train.json").read_text())[1:2]
    sub.write_text(json.dumps(records))
    # Attention MSEs are ~1e-9..1e-7 (maps are ~1/T per entry) against a CE of ~5: large static
    # weights let them move the shared parameters within 16 steps.
    cfg = _cfg(tiny_models, demo_data, tmp_path / "run", data=sub, images=demo_data, max_steps=16, lr=3e-3, projection="agp",
               w_perception=1e8, w_reasoning=1e8, w_planning=1e8, max_grad_norm=0.0, mix="1,1,1;1,1,1;1,1,1")
    res = train(cfg, targets)
    first, last = res.metrics[:4], res.metrics[-4:]  # each epoch visits all 4 samples once
    for key in ("loss_ce", "raw_perception", "raw_reasoning", "raw_planning"):
        a = sum(r[key] for r in first) / 4
        b = sum(r[key] for r in last) / 4
        assert b < 0.9 * a, (key, a, b)


def test_micro_batch_pads_targets(tiny_models, samples, targets, tmp_path, demo_data):
    """A padded micro-batch of 2 gives each sample the losses it has alone (both padding sides)."""
    from drivekd.trainer.plan import validate
    from drivekd.trainer.data import Collate
    from drivekd.trainer.loop import Dist, Trainer

    pair = [samples[0], samples[3]]  # one view and six views: very different lengths
    for family in ("internvl", "qwen2_5_vl"):
        tg = targets if family == "internvl" else compute_targets(tiny_models / "qwen2_5_vl-teacher", pair, TEACHER_LAYERS)
        cfg = _cfg(tiny_models, demo_data, tmp_path / family, student=tiny_models / f"{family}-student")
        plan = validate(replace(cfg, data=_subset(demo_data, tmp_path, [0, 3]), images=demo_data), tg)
        trainer = Trainer(plan, tg, Dist("cpu"))
        collate = Collate(trainer.family, plan.terms, tg)
        items = [(s, {r: tg.get(r, s.id, plan.terms[k].teacher_layers) for k, r in enumerate(plan.row_names[1:])}) for s in pair]
        both = collate(items)
        assert both.inputs.tensors["attention_mask"].eq(0).any()
        assert both.inputs.padding_side == ("left" if family == "internvl" else "right")

        def per_sample(batch):
            from drivekd.families.capture import capture_attention

            with torch.no_grad(), capture_attention(trainer.model, plan.student_layers, attention_mask=batch.inputs.tensors["attention_mask"].bool()) as maps:
                return trainer.train_step.forward(batch, maps).per_sample

        joint = per_sample(both)
        alone = torch.cat([per_sample(collate([it])) for it in items], dim=1)
        torch.testing.assert_close(joint, alone, rtol=2e-4, atol=1e-9)


def _subset(demo_data, tmp_path, idx):
    records = json.loads((demo_data / "train.json").read_text())
    p = tmp_path / f"subset-{'-'.join(map(str, idx))}.json"
    p.write_text(json.dumps([records[i] for i in idx]))
    return p


def test_alignment_mismatch_names_sample(tiny_models, demo_data, samples, targets, tmp_path):
    victim = samples[2]
    other = replace(victim, answer=victim.answer + " And more words.")
    wrong = compute_targets(tiny_models / "internvl-teacher", [other], TEACHER_LAYERS)
    table = {r: {s.id: targets.get(r, s.id) for s in samples} for r in TEACHER_LAYERS}
    for r in TEACHER_LAYERS:
        table[r][victim.id] = wrong.get(r, victim.id)
    bad = InMemoryTargets({r: targets.role_info(r) for r in TEACHER_LAYERS}, table)
    data = _subset(demo_data, tmp_path, [2])
    with pytest.raises(AlignmentError, match=rf"sample {victim.id}.*length \d+ \(student\) vs \d+ \(store\).*first differing position \d+"):
        train(_cfg(tiny_models, demo_data, tmp_path / "run", data=data, images=demo_data, max_steps=1), bad)


def _poisoned(targets, samples, sid):
    table = {r: {s.id: targets.get(r, s.id) for s in samples} for r in TEACHER_LAYERS}
    t = table["perception"][sid]
    table["perception"][sid] = SampleTargets(t.sample_id, t.fingerprint, t.vision, t.text, {0: torch.full_like(t.maps[0], float("nan"))})
    return InMemoryTargets({r: targets.role_info(r) for r in TEACHER_LAYERS}, table)


@pytest.mark.slow
def test_nonfinite_loss_stops_or_skips(tiny_models, demo_data, samples, targets, tmp_path):
    sid = samples[0].id
    bad = _poisoned(targets, samples, sid)
    data = _subset(demo_data, tmp_path, [0, 1])
    cfg = _cfg(tiny_models, demo_data, tmp_path / "stop", data=data, images=demo_data, max_steps=2, save_every=1, grad_accum=2)
    with pytest.raises(DriveKDError, match=rf"non-finite loss at step 1 .*{sid}"):
        train(cfg, bad)
    assert not list_checkpoints(tmp_path / "stop")
    res = train(replace(cfg, out=tmp_path / "skip", skip_nonfinite=True, max_skip_share=0.5), bad)
    assert [r["skipped"] for r in res.metrics] == [[sid], [sid]]
    assert all(math.isfinite(l) for l in res.losses)
    for w in _weights(tmp_path / "skip" / "final").values():
        assert torch.isfinite(w).all()
    # At the default budget (1% of the run's 4 micro-batches: none) the first skip stops the run, naming it.
    with pytest.raises(DriveKDError, match=rf"skipped 1 micro-batch\(es\) by step 1, more than --max-skip-share 0.01 .*{sid}"):
        train(replace(cfg, out=tmp_path / "budget", skip_nonfinite=True), bad)
    assert not (tmp_path / "budget" / "final").exists()


def test_a_run_that_trains_on_nothing_writes_no_final(tiny_models, demo_data, samples, targets, tmp_path):
    # Once: every sample skipped, loss null, exit 0 and final/ written (the untouched initial student).
    sid = samples[0].id
    bad = _poisoned(targets, samples, sid)
    cfg = _cfg(tiny_models, demo_data, tmp_path / "none", data=_subset(demo_data, tmp_path, [0]), images=demo_data,
               max_steps=2, save_every=0, skip_nonfinite=True, max_skip_share=1.0)
    with pytest.raises(DriveKDError, match=r"no micro-batch of steps 1..2 was trained .*final/ is not written"):
        train(cfg, bad)
    assert not (tmp_path / "none" / "final").exists()


@contextlib.contextmanager
def saved_for_backward():
    """Record (dtype, bytes) of every tensor autograd saves for backward in this thread. Tensors
    saved inside a non-reentrant checkpointed region go to the checkpoint's own hooks instead."""
    seen: list[tuple[torch.dtype, int]] = []

    def pack(t):
        seen.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def test_gradient_checkpointing_same_step(tiny_models, demo_data, targets, tmp_path):
    kw = dict(max_steps=1, lr=1e-3, dynamic_weights=True)
    with saved_for_backward() as saved_a:
        a = train(_cfg(tiny_models, demo_data, tmp_path / "a", **kw), targets)
    with saved_for_backward() as saved_b:
        b = train(_cfg(tiny_models, demo_data, tmp_path / "b", gradient_checkpointing=True, **kw), targets)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # Checkpointing is really on: the decoder layers' activations are not kept for backward.
    kept_a, kept_b = sum(n for _, n in saved_a), sum(n for _, n in saved_b)
    assert kept_b < 0.6 * kept_a, (kept_a, kept_b)


def test_bf16_autocast_step(tiny_models, demo_data, targets, tmp_path):
    with saved_for_backward() as saved:
        res = train(_cfg(tiny_models, demo_data, tmp_path / "run", dtype="bfloat16", max_steps=1), targets)
    assert math.isfinite(res.losses[0])
    # Autocast is really on: the matmuls saved bf16 inputs for backward (none at all without it;
    # on tiny models the capture's fp32 maps are most of what is saved).
    bf16 = sum(n for dt, n in saved if dt == torch.bfloat16)
    assert bf16 > 0.05 * sum(n for _, n in saved), {dt: sum(n for d, n in saved if d == dt) for dt, _ in saved}
    # and the weights stay fp32 (mixed precision, not a bf16 model).
    assert all(w.dtype == torch.float32 for w in _weights(tmp_path / "run" / "final").values())


@pytest.mark.slow
def test_zero_weights_skip_rows(tiny_models, demo_data, targets, tmp_path):
    """An identity mixing matrix leaves one teacher row per single-sample micro-step; a zero static
    weight removes the term (no targets read, no backward, no re-weighting)."""
    res = train(_cfg(tiny_models, demo_data, tmp_path / "eye", mix="1,0,0;0,1,0;0,0,1", max_steps=2, grad_accum=3,
                     dynamic_weights=True), targets)
    shares = [r["active_share"] for r in res.metrics]
    assert all(s["ce"] == 1.0 for s in shares)
    # Each sample has one capability, so each micro-step fills exactly one teacher row.
    assert all(abs(sum(s[k] for k in ("perception", "reasoning", "planning")) - 1.0) < 1e-9 for s in shares)
    res = train(_cfg(tiny_models, demo_data, tmp_path / "off", w_perception=0.0, w_ce=0.0, max_steps=1, dynamic_weights=True), targets)
    assert res.plan.row_names == ["ce", "reasoning", "planning"]
    rec = res.metrics[-1]
    assert rec["weights"]["ce"] == 0.0 and rec["active_share"]["ce"] == 0.0 and rec["grad_norms"]["ce"] is None


def test_sft_baseline_needs_no_store(tiny_models, demo_data, tmp_path):
    """The CE baseline of the ablation table: --recipe sft trains without a store (optionally on one
    capability split), and a multi run with every teacher weight 0 is the same CE-only run (it
    crashed with an IndexError in the mixing lookup)."""
    sft = train(_cfg(tiny_models, demo_data, tmp_path / "sft", recipe="sft", lr=1e-3, max_steps=2, grad_accum=2))
    assert sft.plan.row_names == ["ce"] and sft.plan.terms == [] and all(math.isfinite(l) for l in sft.losses)
    split = train(_cfg(tiny_models, demo_data, tmp_path / "split", recipe="sft", split="planning", max_steps=1))
    assert {s.capability for s in split.plan.samples} == {"planning"}
    off = train(_cfg(tiny_models, demo_data, tmp_path / "off", lr=1e-3, max_steps=2, grad_accum=2, projection="none",
                     w_perception=0.0, w_reasoning=0.0, w_planning=0.0))
    assert off.plan.row_names == ["ce"]
    assert off.losses == pytest.approx(sft.losses, rel=1e-6)  # same data order, same CE-only step


def test_reference_text_set_end_to_end(tiny_models, demo_data, tmp_path):
    """--text-tokens not_vision (the reference trainer's X set) runs end to end: the build stores it,
    the trainer uses it, and a student with the other setting is refused, naming --text-tokens."""
    from drivekd.teacher.build import BuildConfig, build
    from drivekd.store import TeacherStore

    recs = [r for r in json.loads((demo_data / "train.json").read_text()) if r["question_type"] == "planning"][:2]
    data = tmp_path / "two.json"
    data.write_text(json.dumps(recs))
    t = tiny_models / "internvl-teacher"
    build(BuildConfig(teachers={"planning": t}, data=data, images=demo_data, out=tmp_path / "c", progress=False,
                      text_tokens="not_vision"))
    st = TeacherStore(tmp_path / "c").get("planning", load_samples(data, demo_data)[0].id)
    assert bool((st.text == ~st.vision).all())  # specials count as text under not_vision
    kw = dict(data=data, images=demo_data, cache=tmp_path / "c", recipe="planning", max_steps=1)
    res = train(_cfg(tiny_models, demo_data, tmp_path / "nv", text_tokens="not_vision", **kw))
    assert math.isfinite(res.losses[0])
    with pytest.raises(AlignmentError, match="--text-tokens"):
        train(_cfg(tiny_models, demo_data, tmp_path / "paper", **{**kw, "recipe": "multi", "w_perception": 0.0,
                                                                     "w_reasoning": 0.0}))


@pytest.mark.parametrize("projection,grad_accum,micro_batch", [("agp", 2, 1), ("g1", 1, 2)])
@pytest.mark.slow
def test_gram_engine_trains_like_the_rows_engine(tiny_models, demo_data, targets, tmp_path, projection, grad_accum,
                                                micro_batch):
    """--grad-engine gram (no K gradient rows) gives the rows engine's run: same losses, weights
    and logged gradient statistics. Two steps (the second runs on re-weighted losses); one case
    accumulates two micro-steps, the other pads a micro-batch of two (each was 2 x 2: measured
    6.5 -> 2 CPU s a case)."""
    kw = dict(max_steps=2, grad_accum=grad_accum, micro_batch=micro_batch, lr=1e-3, dynamic_weights=True,
              projection=projection)
    rows = train(_cfg(tiny_models, demo_data, tmp_path / "rows", grad_engine="rows", **kw), targets)
    gram = train(_cfg(tiny_models, demo_data, tmp_path / "gram", grad_engine="gram", **kw), targets)
    assert gram.losses == pytest.approx(rows.losses, rel=1e-5)
    assert gram.metrics[-1]["weights"] == pytest.approx(rows.metrics[-1]["weights"], rel=1e-4)
    assert gram.metrics[-1]["projections_fired"] == rows.metrics[-1]["projections_fired"]
    # AdamW turns a ~1e-7 gradient difference on a near-zero gradient into up to ~lr x 1% of a step.
    wa, wb = _weights(tmp_path / "rows" / "final"), _weights(tmp_path / "gram" / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_reweighting_sees_raw_unmixed_losses_and_norms(tiny_models, demo_data, targets, tmp_path):
    """METHOD.md section 7 (and the reference trainer): the online re-weighting is fed each loss's
    raw, unmixed L_i and ||grad L_i||, and its target's sum_j G_j is not detached. Rebuilt here from
    the formulas: with mixing rows all equal, M[c, k] does not depend on the sample."""
    from drivekd.optim.reweight import DynamicWeights

    m = [0.6, 0.3, 0.1]
    mix = ";".join([",".join(map(str, m))] * 3)
    res = train(_cfg(tiny_models, demo_data, tmp_path / "rw", mix=mix, max_steps=2, grad_accum=1, micro_batch=1,
                     dynamic_weights=True, reweight_lr=0.05), targets)
    first, second = res.metrics
    names = ["ce", "perception", "reasoning", "planning"]
    w = first["weights"]
    losses = {"ce": first["loss_ce"], **{n: first[f"raw_{n}"] for n in names[1:]}}
    scale = {"ce": w["ce"], **{n: w[n] * m[k] for k, n in enumerate(names[1:])}}
    norms = {n: first["grad_norms"][n] / scale[n] for n in names}
    dw = DynamicWeights(names, [1.0] * 4, lr=0.05, detach_target=False)
    expected = dict(zip(names, dw.update(losses, norms)))
    assert second["weights"] == pytest.approx(expected, rel=1e-5)
    # Mixed losses or a detached target would give other weights.
    other = DynamicWeights(names, [1.0] * 4, lr=0.05, detach_target=True)
    assert dict(zip(names, other.update(losses, norms))) != pytest.approx(expected, rel=1e-5)
