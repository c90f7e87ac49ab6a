"""The synthetic benchmark: disjoint splits by scene, deterministic, answers readable from the pixels."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from drivekd.demo import benchmark as bm
from drivekd.demo.scenes import LIGHT_RGB, generate_scene
from drivekd.errors import ConfigError


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    bm.make_benchmark(out, seed=3, train=12, val=4, heldout=8)
    return out


def _load(path: Path):
    return json.loads(path.read_text())


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_splits_are_disjoint_by_scene(bench):
    scenes = _load(bench / "scenes.json")["splits"]
    tokens = {s: {sc["scene_token"] for sc in scenes[s]} for s in bm.SPLITS}
    frames = {s: {r["frame_token"] for r in _load(bench / f"{s}_drivebench.json")} for s in bm.SPLITS}
    images = {s: {p for r in _load(bench / f"{s}.json") for p in r["images"]} for s in bm.SPLITS}
    assert [len(tokens[s]) for s in bm.SPLITS] == [12, 4, 8]
    for a, b in (("train", "val"), ("train", "heldout"), ("val", "heldout")):
        assert not tokens[a] & tokens[b]
        assert not frames[a] & frames[b]
        assert not images[a] & images[b]
    # Not just fresh tokens: the scene contents differ (no scene redrawn under another name).
    layouts = [json.dumps(sc["objects"]) for s in bm.SPLITS for sc in scenes[s]]
    assert len(set(layouts)) == len(layouts)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    bm.make_benchmark(a, seed=5, train=3, val=1, heldout=2)
    bm.make_benchmark(b, seed=5, train=3, val=1, heldout=2)
    bm.make_benchmark(c, seed=6, train=3, val=1, heldout=2)
    da, db = _tree_digest(a), _tree_digest(b)
    # benchmark.json records the folder it was written to; everything else is byte-identical.
    da.pop("benchmark.json"), db.pop("benchmark.json")
    assert da == db
    assert _load(a / "train.json") != _load(c / "train.json")


def test_train_split_does_not_depend_on_heldout_size(tmp_path):
    bm.make_benchmark(tmp_path / "small", seed=1, train=3, val=0, heldout=1)
    bm.make_benchmark(tmp_path / "large", seed=1, train=3, val=2, heldout=5)
    assert _load(tmp_path / "small" / "train.json") == _load(tmp_path / "large" / "train.json")


def test_formats_capabilities_and_counts(bench):
    train, held = _load(bench / "train.json"), _load(bench / "heldout_drivebench.json")
    assert len(train) == 12 * len(bm.KINDS) and len(held) == 8 * len(bm.KINDS)
    for r in train:
        assert r["messages"][0]["content"].count("<image>") == len(r["images"]) == 1
        assert r["question_type"] in bm.CAPABILITIES
        assert r["messages"][1]["content"].startswith("Final: ")
    assert {r["question_type"] for r in held} == {"perception", "prediction", "behavior", "planning"}
    caps = {bm.QUESTIONS[r["kind"]][0] for r in held}
    assert caps == set(bm.CAPABILITIES)
    info = _load(bench / "benchmark.json")
    assert info["questions"] == {"train": 72, "val": 24, "heldout": 48}
    assert info["heldout_binomial_std"]["perception"] == pytest.approx(100 * (0.25 / 16) ** 0.5, abs=0.01)


def test_letters_follow_the_scene_rules(bench):
    """The reference letter is the ground-truth rule applied to the scene spec the image was drawn from."""
    scenes = {sc["frame_token"]: sc for s in bm.SPLITS for sc in _load(bench / "scenes.json")["splits"][s]}
    for r in _load(bench / "heldout_drivebench.json") + _load(bench / "train_drivebench.json"):
        sc = scenes[r["frame_token"]]
        assert r["answer"] == "ABCD"[bm.correct_option(r["kind"], sc)]
        lead = sc["objects"][0]
        if r["kind"] == "ego_action" and sc["traffic_light"]["colour"] == "green":
            assert r["answer"] == ("C" if lead["z"] < bm.FOLLOW_GAP_M else "D")


def test_light_answer_is_readable_from_pixels(bench):
    """The lit lamp's colour is in the image: the light_colour answer is the lamp colour with the most pixels."""
    for r in _load(bench / "heldout_drivebench.json") + _load(bench / "val_drivebench.json"):
        if r["kind"] != "light_colour":
            continue
        px = np.asarray(Image.open(bench / r["image_path"]["CAM_FRONT"]).convert("RGB")).reshape(-1, 3)
        counts = {c: int((px == np.array(rgb)).all(axis=1).sum()) for c, rgb in LIGHT_RGB.items()}
        seen = max(counts, key=counts.get)
        assert counts[seen] >= 4, counts  # a few pixels wide, not a single dot
        assert r["answer"] == "ABC"[("red", "yellow", "green").index(seen)]


def test_prior_is_the_most_common_train_letter():
    recs = [{"kind": "lead_stop", "answer": x} for x in "AAB"] + [{"kind": "light_colour", "answer": x} for x in "CB"]
    assert bm.prior_letters(recs) == {"lead_stop": "A", "light_colour": "B"}


def test_light_colour_option_keeps_other_draws():
    for s in range(20):
        free = generate_scene(random.Random(s), six_view=False)
        fixed = generate_scene(random.Random(s), six_view=False, light_colour="green")
        assert fixed["traffic_light"]["colour"] == "green"
        assert fixed["traffic_light"]["z"] == free["traffic_light"]["z"]
        assert fixed["objects"][0]["kind"] == free["objects"][0]["kind"]
    with pytest.raises(ValueError, match="light_colour"):
        generate_scene(random.Random(0), six_view=False, light_colour="blue")


def test_bad_counts_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--train"):
        bm.make_benchmark(tmp_path, train=0)
    with pytest.raises(ConfigError, match="--heldout"):
        bm.make_benchmark(tmp_path, train=1, heldout=-1)


def test_cli_writes_the_splits(tmp_path):
    res = CliRunner().invoke(bm.main, ["--out", str(tmp_path / "b"), "--seed", "2", "--train", "2", "--val", "1",
                                       "--heldout", "1"])
    assert res.exit_code == 0, res.output
    assert "heldout 6" in res.output
    for s in bm.SPLITS:
        assert (tmp_path / "b" / f"{s}.json").is_file() and (tmp_path / "b" / f"{s}_drivebench.json").is_file()


def test_format_only_split_keeps_questions_and_randomises_letters(bench):
    train = _load(bench / "train.json")
    fmt = bm.format_only_split(train, seed=0)
    assert fmt == bm.format_only_split(train, seed=0)
    assert [r["messages"][0] for r in fmt] == [r["messages"][0] for r in train]
    assert [r["images"] for r in fmt] == [r["images"] for r in train]
    by_q = {bm.question_text(k): k for k in bm.KINDS}
    agree = 0
    for r, t in zip(fmt, train):
        kind = by_q[r["messages"][0]["content"].replace("<image>", "")]
        ans = r["messages"][1]["content"]
        assert ans in {bm.answer_text(kind, i) for i in range(len(bm.QUESTIONS[kind][3]))}
        agree += ans == t["messages"][1]["content"]
    # Random letters: agreement with the true answers is near chance (~1/3 here), not near 1.
    assert agree < 0.6 * len(train)
