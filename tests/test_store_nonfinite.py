"""No silent results, round three (issue 24), store side: a teacher with a NaN weight never leaves
complete samples, verify checks finiteness and every sample on disk (orphans of a larger build),
`--out` naming a file is one clear error, and the build names the layers it resolved."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import drivekd.store.writer as writer_module
from drivekd.cli.cache import main as cache_cli
from conftest import five_with_ids
from drivekd.store import TeacherStore
from drivekd.store.integrity import nonfinite

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(demo_data, tmp_path_factory) -> Path:
    """Five samples with explicit ids: a six-view group of two (a shared prefix) and three single views."""
    return five_with_ids(demo_data, tmp_path_factory.mktemp("nonfinite-data"))


def _poisoned(tiny_models: Path, out: Path, key: str, index: tuple) -> Path:
    """A copy of the tiny InternVL teacher with one weight set to NaN."""
    shutil.copytree(tiny_models / "internvl-teacher", out)
    w = load_file(out / "model.safetensors")
    w[key][index] = float("nan")
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def nan_teacher(tiny_models, tmp_path_factory) -> Path:
    """One NaN in layer 0's query projection: head 0's scores, hence every map of every sample, are NaN."""
    return _poisoned(tiny_models, tmp_path_factory.mktemp("nan") / "teacher", "language_model.model.layers.0.self_attn.q_proj.weight", (0, 0))


def _only_in_one(data: Path) -> tuple[str, str]:
    """(sample id, a character) such that only that sample's messages contain the character."""
    recs = json.loads(data.read_text())
    texts = {r["id"]: "".join(m["content"] for m in r["messages"]) for r in recs}
    for sid, text in texts.items():
        for ch in sorted(set(text)):
            if ch.isascii() and ch.isalnum() and all(ch not in t for s, t in texts.items() if s != sid):
                return sid, ch
    raise AssertionError("no character is unique to one sample")


def _cli(*args):
    return CliRunner().invoke(cache_cli, [str(a) for a in args])


def _build(teacher, data, out, *extra):
    return _cli("build", "--teacher", "all", "--model", teacher, "--data", data, "--out", out, "--no-progress", "--writers", "1", *extra)


def test_nonfinite_counts_nan_and_inf_and_allows_log_zero_where_asked():
    assert nonfinite(np.array([0.5, 1.0], dtype=np.float16)) == ""
    assert nonfinite(np.array([np.nan, 1.0, np.nan])) == "2 of 3 values NaN"
    assert nonfinite(np.array([np.inf, np.nan])) == "2 of 2 values NaN or inf"
    assert nonfinite(np.array([-np.inf, 0.0]), allow_neg_inf=True) == ""  # a log-probability of 0
    assert nonfinite(np.array([np.inf, 0.0]), allow_neg_inf=True) == "1 of 2 values inf"
    assert nonfinite(np.array([1, 2], dtype=np.int32)) == ""


@pytest.mark.slow
def test_nan_teacher_is_refused_naming_sample_and_role_and_nothing_is_complete(nan_teacher, data, tmp_path):
    out = tmp_path / "cache"
    r = _build(nan_teacher, data, out)
    assert r.exit_code == 2, r.output
    assert "non-finite" in r.output and "teacher targets for sample 's" in r.output and "attention: " in r.output, r.output
    assert "values NaN" in r.output and "--skip-nonfinite" in r.output and "Traceback" not in r.output
    st = TeacherStore(out)
    assert st.roles() and all(st.summary(role)["complete"] == 0 for role in st.roles())
    # With --skip-nonfinite every sample is recorded as skipped, and the build says the role holds nothing.
    r = _build(nan_teacher, data, out, "--skip-nonfinite")
    assert r.exit_code == 0, r.output
    assert "0 samples written" in r.output and "5 skipped" in r.output, r.output
    assert "warning: every planning sample was skipped" in r.output and "non-finite teacher targets" in r.output, r.output
    info = _cli("info", out)
    assert info.exit_code == 0 and info.output.count("non-finite teacher targets (layer") == 15, info.output  # 5 samples x 3 roles


@pytest.mark.slow
def test_skip_nonfinite_skips_only_the_poisoned_sample_and_info_lists_it(tiny_models, data, tmp_path):
    sid, ch = _only_in_one(data)
    teacher = _poisoned(tiny_models, tmp_path / "teacher", "language_model.model.embed_tokens.weight", (ord(ch), 0))  # byte tokens: id = byte
    r = _build(teacher, data, tmp_path / "refused")
    assert r.exit_code == 2 and f"for sample {sid!r}" in r.output, r.output
    out = tmp_path / "cache"
    r = _build(teacher, data, out, "--skip-nonfinite")
    assert r.exit_code == 0 and "4 samples written" in r.output and "1 skipped" in r.output, r.output
    st = TeacherStore(out)
    for role in st.roles():
        s = st.summary(role)
        assert s["complete"] == 4 and list(s["skipped_reasons"]) == [sid]
        assert s["skipped_reasons"][sid].startswith("non-finite teacher targets (layer ")
    info = _cli("info", out)
    assert f"skipped {sid}: non-finite teacher targets" in info.output, info.output
    assert _cli("verify", out).exit_code == 0
    # A rebuild keeps the record: the sample is done (skipped), not retried forever.
    r = _build(teacher, data, out, "--skip-nonfinite")
    assert r.exit_code == 0 and "0 samples written, 5 already complete" in r.output, r.output


@pytest.mark.slow
def test_verify_finds_nonfinite_targets_a_store_holds_as_complete(nan_teacher, data, tmp_path, monkeypatch):
    """What a store built before the writer refused NaN holds: complete samples of NaN (their
    checksums match). verify names them, --repair removes them."""
    monkeypatch.setattr(writer_module, "nonfinite", lambda *a, **k: "", raising=False)  # the old writer: no check
    out = tmp_path / "cache"
    assert _build(nan_teacher, data, out, "--signals", "attention,hidden").exit_code == 0
    monkeypatch.undo()
    r = _cli("verify", out)
    assert r.exit_code == 1 and "15 problem(s)" in r.output, r.output
    assert "planning/s0: hidden layer 4 not finite" in r.output, r.output
    assert _cli("verify", "--quick", out).exit_code == 0  # --quick reads no content
    # Attention alone is checked too.
    attn_only = tmp_path / "attn"
    monkeypatch.setattr(writer_module, "nonfinite", lambda *a, **k: "", raising=False)
    assert _build(nan_teacher, data, attn_only, "--teacher", "planning").exit_code == 0
    monkeypatch.undo()
    r = _cli("verify", attn_only)
    assert r.exit_code == 1 and "planning/s3: layer 4 attention is not finite" in r.output and "values NaN" in r.output, r.output
    r = _cli("verify", "--repair", attn_only)
    assert r.exit_code == 1 and "removed" in r.output
    assert TeacherStore(attn_only).summary("planning")["missing"] == 5


def test_verify_checks_orphans_of_a_larger_build_and_can_drop_them(tiny_models, data, tmp_path):
    teacher = tiny_models / "internvl-teacher"
    out = tmp_path / "cache"
    assert _build(teacher, data, out, "--teacher", "planning").exit_code == 0
    fewer = data.parent / "fewer.json"
    fewer.write_text(json.dumps(json.loads(data.read_text())[:3]))  # s0, s1, s2
    r = _build(teacher, fewer, out, "--teacher", "planning")
    assert r.exit_code == 0 and "3 already complete" in r.output, r.output
    chunk = out / "planning" / "samples" / "s4" / "attn" / "c" / "0" / "0"  # a leftover of the larger build
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 0xFF
    chunk.write_bytes(bytes(b))
    r = _cli("verify", out)
    assert r.exit_code == 1 and "planning/s4 (orphan: not in the last build data): unreadable" in r.output, r.output
    assert "1 problem(s)" in r.output and "2 orphan sample(s) on disk, not in the last build's data: s3, s4 (checked too" in r.output
    st = TeacherStore(out)
    assert st.orphans("planning") == ["s3", "s4"]
    assert "2 orphan sample(s)" in _cli("info", out).output
    r = _cli("verify", "--repair", out)
    assert r.exit_code == 1 and "removed 1 sample" in r.output, r.output
    assert st.orphans("planning") == ["s3"]
    r = _cli("verify", "--drop-orphans", out)
    assert r.exit_code == 0 and "s3 (removed)" in r.output, r.output
    assert st.orphans("planning") == [] and not (out / "planning" / "samples" / "s3").exists()
    assert sorted(p.name for p in (out / "planning" / "samples").iterdir() if p.is_dir()) == ["s0", "s1", "s2"]
    assert zarr.open_group(str(out / "planning"), mode="r").attrs["sample_ids"] == ["s0", "s1", "s2"]


def test_build_prints_the_layers_each_role_resolved(tiny_models, data, tmp_path):
    # one sample: the lines name the layers, whatever the data (five samples x three roles cost ~1 CPU s more)
    one = data.parent / "one-sample.json"  # beside the data: its images resolve from there
    one.write_text(json.dumps(json.loads(data.read_text())[2:3]))
    r = _build(tiny_models / "internvl-teacher", one, tmp_path / "one", "--teacher", "planning", "--layers", "L-3")
    assert r.exit_code == 0, r.output
    assert "drivekd-cache: planning: teacher layers [3] (--layers L-3, of 6 in internvl-teacher)" in r.output, r.output
    r = _build(tiny_models / "internvl-teacher", one, tmp_path / "cache")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if "teacher layers" in x]
    assert lines == ["drivekd-cache: perception: teacher layers [0] (recipe, of 6 in internvl-teacher)",
                     "drivekd-cache: reasoning: teacher layers [0, 1, 2, 3, 4] (recipe, of 6 in internvl-teacher)",
                     "drivekd-cache: planning: teacher layers [4] (recipe, of 6 in internvl-teacher)"], r.output


def test_out_naming_an_existing_file_is_one_clear_error(tiny_models, data, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a store")
    r = _build(tiny_models / "internvl-teacher", data, f)
    assert r.exit_code == 2 and f"--out {f} is an existing file" in r.output and "Traceback" not in r.output, r.output
    assert f.read_text() == "not a store"
    r = _build(tiny_models / "internvl-teacher", data, f / "cache")  # a file where a parent folder should be
    assert r.exit_code == 2 and "could not write the store lock (or its folder)" in r.output and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
