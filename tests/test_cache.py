"""drivekd-cache: store contents, resume after kill -9, sharded build, bad input, refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from drivekd.cli.cache import main as cache_cli
from drivekd.data import load_samples
from drivekd.errors import StoreError
from drivekd.families import Family, capture_attention, load_model
from drivekd.layers import recipe_layers
from drivekd.teacher.build import BuildConfig, build
from drivekd.store import Encoding, TeacherStore, check_key, pack_tril, unpack_tril

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_models, data, out, **kw):
    t = tiny_models / "internvl-teacher"
    return BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=data, images=None, out=out, progress=False, **kw)


@pytest.fixture(scope="module")
def built(tiny_models, small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "cache"
    res = build(_cfg(tiny_models, small_data, out))
    assert res["written"] == 5
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_matches_direct_capture(tiny_models, small_data, built):
    store = TeacherStore(built)
    assert store.roles() == ["perception", "reasoning", "planning"]
    L = 6
    assert store.role_info("perception").layers == (0,)
    assert store.role_info("planning").layers == (L - 2,)
    assert store.role_info("reasoning").layers == tuple(range(L - 1)) == tuple(recipe_layers("reasoning", L))
    fam = Family.from_pretrained(tiny_models / "internvl-teacher")
    model = load_model(tiny_models / "internvl-teacher")
    samples = load_samples(small_data)
    for s in samples[:2]:
        inputs = fam.build_inputs([s])
        with torch.no_grad(), capture_attention(model, [0, 4]) as maps:
            model(**inputs.tensors)
        t = store.get("reasoning", s.id, [0, 4])
        lay = inputs.layouts[0]
        assert t.fingerprint == lay.fingerprint
        assert torch.equal(t.vision, lay.vision) and torch.equal(t.text, lay.text)
        for l in (0, 4):
            ref = maps[l][0]
            # fp16 storage: relative rounding 2^-11.
            assert torch.allclose(t.maps[l], ref, rtol=1e-3, atol=1e-6)
            assert torch.triu(t.maps[l], 1).abs().max() == 0
        # The planning role holds the same layer-4 map as the reasoning role.
        assert torch.equal(store.get("planning", s.id).maps[4], t.maps[4])


def test_store_is_plain_zarr(built):
    """Readable with zarr alone, as docs/STORE.md describes (prefix blocks included)."""
    root = zarr.open_group(str(built), mode="r")
    assert root.attrs["drivekd"]["schema_version"] == 3
    role = root["perception"]
    for sid in role.attrs["sample_ids"]:
        g = role["samples"][sid]
        assert g.attrs["status"] == "complete"
        T = g.attrs["length"]
        packed = np.asarray(g["attn"][0], dtype=np.float32)
        P = 0
        if g.attrs.get("prefix"):
            P = g.attrs["prefix_length"]
            packed = np.concatenate([np.asarray(role["prefixes"][g.attrs["prefix"]]["attn"][0], dtype=np.float32), packed])
        assert g["attn"].dtype == np.float16 and g["attn"].shape == (1, T * (T + 1) // 2 - P * (P + 1) // 2)
        A = np.zeros((T, T), np.float32)
        for i in range(T):
            A[i, : i + 1] = packed[i * (i + 1) // 2 : (i + 1) * (i + 2) // 2] / (i + 1)
        # Causal rows sum to one; the first query attends only to itself.
        assert abs(A[0, 0] - 1) < 1e-3 and np.allclose(A.sum(1), 1, atol=3e-3)
    assert any(role["samples"][s].attrs.get("prefix") for s in role.attrs["sample_ids"])


def test_info_and_verify_cli(built, tmp_path):
    r = CliRunner().invoke(cache_cli, ["info", str(built), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["perception"]["complete"] == 5 and info["perception"]["compression_ratio"] > 2
    assert CliRunner().invoke(cache_cli, ["verify", str(built)]).exit_code == 0
    # Break one sample: verify must fail naming it.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    sid = zarr.open_group(str(broken / "planning"), mode="r").attrs["sample_ids"][1]
    chunk = next(p for p in (broken / "planning" / "samples" / sid / "attn" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    r = CliRunner().invoke(cache_cli, ["verify", str(broken)])
    assert r.exit_code == 1 and sid in r.output


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tiny_models, small_data, built, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "drivekd.cli.cache", "build", "--teacher", "all", "--model", str(tiny_models / "internvl-teacher"),
           "--data", str(small_data), "--out", str(out), "--no-progress"]
    # SIGKILL in the middle of the 3rd sample (after 24 attention-row writes: a shared prefix and two members of 7 rows each).
    p = subprocess.run(cmd, env={**os.environ, "DRIVEKD_FAULT_KILL_AFTER": "24"}, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    st = TeacherStore(out)
    statuses = [st.sample_status("reasoning", s) for s in st.role_meta("reasoning")["sample_ids"]]
    assert "complete" in statuses and statuses != ["complete"] * 5
    # The same command again, in this process (the kill is what needs a process of its own).
    r = CliRunner().invoke(cache_cli, cmd[3:])
    assert r.exit_code == 0, r.output
    assert "already complete" in r.output
    assert _files(out) == _files(built)


def test_refuses_other_settings_and_overwrites(tiny_models, small_data, built, tmp_path):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(built, out)
    cfg = _cfg(tiny_models, small_data, out, layers={"perception": [1], "reasoning": [0], "planning": [4]})
    with pytest.raises(StoreError, match=r"layers: store has \[0\], this build \[1\]"):
        build(cfg)
    with pytest.raises(StoreError, match="encoding"):
        build(_cfg(tiny_models, small_data, out, encoding=Encoding("lossy", keepbits=3)))
    with pytest.raises(StoreError, match="checkpoint_fingerprint"):
        other = tiny_models / "qwen2_5_vl-teacher"
        build(BuildConfig(teachers={"perception": other}, data=small_data, images=None, out=out, progress=False))
    cfg = _cfg(tiny_models, small_data, out, layers={"perception": [1]}, overwrite=True)
    cfg.teachers = {"perception": cfg.teachers["perception"]}
    res = build(cfg)
    assert res["written"] == 5 and TeacherStore(out).role_info("perception").layers == (1,)


def test_bad_image_stops_or_is_skipped(tiny_models, small_data, tmp_path):
    recs = json.loads(small_data.read_text())
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    recs[3]["images"] = [str(bad)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(recs))
    bad_id = load_samples(data, check_images=False)[3].id
    t = str(tiny_models / "internvl-teacher")
    out = tmp_path / "cache"
    r = CliRunner().invoke(cache_cli, ["build", "--teacher", "perception", "--model", t, "--data", str(data), "--out", str(out), "--no-progress"])
    assert r.exit_code == 2 and bad_id in r.output and "broken.png" in r.output
    assert TeacherStore(out).sample_status("perception", bad_id) != "complete"
    r = CliRunner().invoke(cache_cli, ["build", "--teacher", "perception", "--model", t, "--data", str(data), "--out", str(out), "--no-progress", "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert "skipped ids: " + bad_id in r.output
    st = TeacherStore(out)
    assert st.sample_status("perception", bad_id) == "skipped"
    assert st.summary("perception")["complete"] == 4
    with pytest.raises(StoreError, match="skipped"):
        st.get("perception", bad_id)


def test_reader_errors(built):
    st = TeacherStore(built)
    sid = st.role_meta("perception")["sample_ids"][0]
    with pytest.raises(StoreError, match="missing"):
        st.get("perception", "no-such-sample")
    with pytest.raises(StoreError, match=r"stores layers \[0\], not \[3\]"):
        st.get("perception", sid, [3])
    with pytest.raises(StoreError, match="no teacher store"):
        TeacherStore(built / "nope")
    for evil in ["../escape", "a/b", "..", "/abs", "a\\b"]:
        with pytest.raises(StoreError, match="not a safe store key"):
            check_key(evil)


def test_missing_role_names_command(tiny_models, small_data, tmp_path):
    t = tiny_models / "qwen2_5_vl-teacher"
    out = tmp_path / "cache"
    build(BuildConfig(teachers={"planning": t}, data=small_data, images=None, out=out, progress=False))
    st = TeacherStore(out)
    assert st.roles() == ["planning"] and st.role_info("planning").family == "qwen2_5_vl"
    with pytest.raises(StoreError, match="--teacher perception"):
        st.role_info("perception")


def test_device_packing_equals_host_packing():
    """The GPU path packs with a boolean mask; it must give the host path's bytes (run here on CPU)."""
    from drivekd.store.format import _pack_masked, pack_rows

    m = torch.rand(9, 9).tril()
    for row0, rows in ((0, m), (4, m[4:])):
        counts = torch.arange(row0 + 1, row0 + rows.shape[0] + 1, dtype=torch.float32)[:, None]
        dev = _pack_masked((rows * counts).to(torch.float16), row0).numpy()
        assert np.array_equal(dev, pack_rows(rows, row0))
    # Suffix rows after a prefix continue the full map's packed sequence.
    assert np.array_equal(np.concatenate([pack_rows(m[:4]), pack_rows(m[4:], 4)]), pack_rows(m))


def test_pack_roundtrip_and_lossy_bound():
    m = torch.tril(torch.rand(7, 7))
    assert torch.equal(unpack_tril(pack_tril(m), 7), m)
    x = (torch.rand(10000) * 0.5 + 1e-4).to(torch.float16).numpy()
    for k in (2, 4, 7):
        q = Encoding("lossy", keepbits=k).quantise(x)
        rel = np.abs(q.astype(np.float32) - x.astype(np.float32)) / x.astype(np.float32)
        assert rel.max() <= 2.0 ** -(k + 1) + 1e-6
        assert rel.max() > 0
    assert np.array_equal(Encoding().quantise(x), x)
