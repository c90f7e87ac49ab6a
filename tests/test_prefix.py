"""Prefix-shared teacher pass: equal to the unshared computation, stored once, read back whole."""

import json
import shutil

import pytest
import torch
import zarr
from click.testing import CliRunner

from drivekd.cli.cache import main as cache_cli
from drivekd.data import load_samples
from drivekd.errors import StoreError
from drivekd.families import Family, capture_attention, load_model
from drivekd.teacher.build import BuildConfig, build
from drivekd.teacher.forward import common_prefix_length, image_groups, shared_forward
from drivekd.store import TeacherStore


@pytest.fixture(scope="module")
def group_data(demo_data, tmp_path_factory):
    """One six-view group with three questions, one single-view group with two, one lone sample."""
    recs = json.loads((demo_data / "train.json").read_text())
    by_imgs = {}
    for r in recs:
        by_imgs.setdefault(tuple(r["images"]), []).append(r)
    six = next(v for k, v in by_imgs.items() if len(k) == 6)[:3]
    ones = [v for k, v in by_imgs.items() if len(k) == 1]
    chosen = six + ones[0][:2] + ones[1][:1]
    for r in chosen:
        r["images"] = [str(demo_data / p) for p in r["images"]]
    d = tmp_path_factory.mktemp("groups")
    (d / "train.json").write_text(json.dumps(chosen))
    return d / "train.json"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_shared_forward_equals_unshared(tiny_models, group_data, family):
    path = tiny_models / f"{family}-teacher"
    fam = Family.from_pretrained(path)
    model = load_model(path)
    group = image_groups(load_samples(group_data))[0]
    assert len(group) == 3 and len(group[0].images) == 6
    enc = [fam.encode(s) for s in group]
    layers = [0, 2, 4]
    res = shared_forward(model, enc, layers)
    P = res.prefix_length
    # The prefix covers the system turn and all image tokens: most of the sequence.
    n_vision = int(enc[0][1].vision.sum())
    assert P > n_vision and P == common_prefix_length([lay.input_ids for _, lay in enc])
    for (tens, lay), rows in zip(enc, res.suffixes):
        with torch.no_grad(), capture_attention(model, layers) as maps:
            model(**tens)
        T = lay.length
        for l in layers:
            full = maps[l][0]
            torch.testing.assert_close(res.prefix[l], full[:P, :P], rtol=1e-5, atol=1e-6)
            assert rows[l].shape == (T - P, T)
            torch.testing.assert_close(rows[l], full[P:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shared_store_reads_like_unshared(tiny_models, group_data, tmp_path):
    t = tiny_models / "qwen2_5_vl-teacher"
    stores = {}
    for share in (True, False):
        out = tmp_path / f"cache-{share}"
        build(BuildConfig(teachers={"reasoning": t, "planning": t}, data=group_data, images=None, out=out, progress=False, share_prefix=share))
        stores[share] = TeacherStore(out)
    shared, plain = stores[True], stores[False]
    for s in load_samples(group_data):
        a, b = shared.get("reasoning", s.id), plain.get("reasoning", s.id)
        assert a.fingerprint == b.fingerprint and torch.equal(a.vision, b.vision)
        for l in a.maps:
            assert a.maps[l].shape == b.maps[l].shape
            # Both are fp16-stored; the computations agree to fp32 rounding.
            torch.testing.assert_close(a.maps[l], b.maps[l], rtol=2e-3, atol=1e-5)
    info = shared.summary("reasoning")
    assert info["prefix_groups"] == 2 and info["questions_per_group"] == 2.5 and info["unshared_samples"] == 1
    assert info["bytes_saved_by_sharing"] > 0
    assert info["attn_bytes"] < plain.summary("reasoning")["attn_bytes"]
    assert not shared.verify("reasoning")
    # Each prefix stored once per role, members point at it.
    pdirs = sorted(p.name for p in (shared.path / "reasoning" / "prefixes").iterdir() if p.is_dir())
    assert len(pdirs) == 2
    r = CliRunner().invoke(cache_cli, ["info", str(shared.path)])
    assert r.exit_code == 0 and "shared prefixes: 2 groups" in r.output


def test_broken_prefix_is_detected(tiny_models, group_data, tmp_path):
    out = tmp_path / "cache"
    build(BuildConfig(teachers={"planning": tiny_models / "internvl-teacher"}, data=group_data, images=None, out=out, progress=False))
    st = TeacherStore(out)
    pdir = next(p for p in (out / "planning" / "prefixes").iterdir() if p.is_dir())
    g = zarr.open_group(str(pdir), mode="a")
    g.attrs["status"] = "writing"  # as if killed while writing the prefix
    member = next(s for s in st.role_meta("planning")["sample_ids"] if st.sample_status("planning", s) == "complete"
                  and json.loads((out / "planning" / "samples" / s / "zarr.json").read_text())["attributes"].get("prefix") == pdir.name)
    with pytest.raises(StoreError, match="shared prefix"):
        TeacherStore(out).get("planning", member)
    assert any(member in p for p in TeacherStore(out).verify("planning"))


def test_v1_store_is_read_and_not_written(tiny_models, group_data, tmp_path):
    out = tmp_path / "cache"
    t = tiny_models / "internvl-teacher"
    build(BuildConfig(teachers={"perception": t}, data=group_data, images=None, out=out, progress=False, share_prefix=False))
    root = zarr.open_group(str(out), mode="a")
    root.attrs["drivekd"] = {"schema_version": 1, "kind": "teacher-store"}
    st = TeacherStore(out)
    sid = st.role_meta("perception")["sample_ids"][0]
    assert st.get("perception", sid).maps[0].shape[0] > 0
    with pytest.raises(StoreError, match="schema-version 1 store.*new --out"):
        build(BuildConfig(teachers={"perception": t}, data=group_data, images=None, out=out, progress=False))
    shutil.rmtree(out)
