"""Synthetic demo data: deterministic, loadable in both formats, answers agree with the drawing."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from drivekd.data import CAMERA_ORDER, CAPABILITIES, load_samples
from drivekd.demo.scenes import ACTION_TEXT, LAMP_OFF, LIGHT_RGB, VEHICLE_SIZE, make_demo_data

REPO = Path(__file__).resolve().parents[1]
REF_RE = re.compile(r"<c\d+,(CAM_[A-Z_]+),(\d\.\d{4}),(\d\.\d{4})>")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(out, 12, questions_per_group=6, seed=3)
    scenes = json.loads((out / "scenes.json").read_text())
    return out, summary, scenes


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a")  # the defaults
    make_demo_data(tmp_path / "b")
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb and len(ta) == a["images"] + 3
    assert (a["groups"], a["six_view_groups"], a["images"], a["samples"]) == (12, 6, 6 * 6 + 6, 48)
    make_demo_data(tmp_path / "c", seed=43)
    assert _tree(tmp_path / "c") != ta


def test_both_files_load_and_cover_every_capability(demo):
    out, summary, _ = demo
    kd = load_samples(out / "train.json")
    db = load_samples(out / "drivebench.json")
    assert len(kd) == len(db) == summary["samples"] == 12 * 6
    for samples in (kd, db):
        assert set(Counter(s.capability for s in samples)) == set(CAPABILITIES)
    assert {s.question_type for s in db} == {"perception", "prediction", "behavior", "planning"}
    # same scenes, same questions, in the same order; the answers agree (letter vs "Final: <letter>.")
    for a, b in zip(kd, db):
        assert a.images == b.images and a.question == b.question and a.capability == b.capability
        assert a.answer.startswith("Final: ") and "\nSupport: " in a.answer
        tag = b.record["tag"][0]
        if tag == 0:
            assert re.fullmatch(r"[A-D]", b.answer) and a.answer.startswith(f"Final: {b.answer}. ")
            assert "\nA. " in b.question and "\nB. " in b.question
        else:
            assert a.answer.startswith(f"Final: {b.answer}")
            assert tag == {"perception": 2, "reasoning": 3, "planning": 1}[b.capability]


def test_six_view_groups_have_six_images_in_camera_order(demo):
    out, _, scenes = demo
    for path in (out / "train.json", out / "drivebench.json"):
        samples = load_samples(path)
        six = [s for s in samples if len(s.images) == 6]
        single = [s for s in samples if len(s.images) == 1]
        assert len(six) + len(single) == len(samples) and six and single
        for s in six:
            assert [p.stem for p in s.images] == list(CAMERA_ORDER)
            assert len({p.parent for p in s.images}) == 1
        for s in single:
            assert s.images[0].stem == "CAM_FRONT"
    with Image.open(out / scenes["scenes"][0]["images"]["CAM_FRONT"]) as im:
        assert im.size == (224, 128) and im.mode == "RGB"


@pytest.mark.parametrize("n", [1, 3, 8])
def test_each_group_has_the_requested_number_of_questions(tmp_path, n):
    make_demo_data(tmp_path, 5, questions_per_group=n, seed=n, six_view_fraction=0.4)
    per_group = Counter(s.images for s in load_samples(tmp_path / "train.json"))
    assert sorted(per_group.values()) == [n] * 5
    assert sum(len(k) == 6 for k in per_group) == 2  # round(5 * 0.4)
    kinds = json.loads((tmp_path / "scenes.json").read_text())["scenes"]
    for scene in kinds:
        assert len({q["kind"] for q in scene["questions"]}) == n  # distinct kinds per group
        if n >= 3:
            assert {q["capability"] for q in scene["questions"]} == set(CAPABILITIES)


def _nearest_light(rgb) -> str:
    return min(LIGHT_RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(LIGHT_RGB[c], rgb)))


def test_traffic_light_answer_matches_spec_and_pixels(demo):
    out, _, data = demo
    asked = 0
    for scene in data["scenes"]:
        colour = scene["traffic_light"]["colour"]
        lamps = scene["views"]["CAM_FRONT"]["lamps"]
        with Image.open(out / scene["images"]["CAM_FRONT"]) as im:
            rgb = im.convert("RGB")
            lit = rgb.getpixel(tuple(lamps[colour]))
            assert lit == LIGHT_RGB[colour] and _nearest_light(lit) == colour
            for other in LIGHT_RGB:
                if other != colour:
                    assert rgb.getpixel(tuple(lamps[other])) == LAMP_OFF
        for q in scene["questions"]:
            if q["kind"] == "light_colour":
                asked += 1
                assert q["answer"] == colour and q["drivekd_answer"].startswith(f"Final: {colour}\n")
    assert asked > 0


def test_object_answers_match_the_scene(demo):
    out, _, data = demo
    checked = defaultdict(int)
    for scene in data["scenes"]:
        objs = {o["oid"]: o for o in scene["objects"]}
        cams = set(scene["images"])
        for q in scene["questions"]:
            refs = REF_RE.findall(q["question"])
            for cam, cx, cy in refs:
                assert cam in cams and 0 <= float(cx) < 1 and 0 <= float(cy) < 1
            if "object" in q:
                ref = scene["refs"][q["object"]]
                view = scene["views"][ref["camera"]]["objects"][q["object"]]
                assert view["visible"] >= 0.5 and refs[0] == (ref["camera"], *(f"{v:.4f}" for v in ref["centre"]))
            chosen = q["options"]["ABCD".index(q["answer"])] if "options" in q else None
            if q["kind"] == "vehicle_type":
                assert chosen.lower() == objs[q["object"]]["kind"] and chosen.lower() in VEHICLE_SIZE
            elif q["kind"] == "vehicle_colour":
                assert chosen.lower() == objs[q["object"]]["colour"]
            elif q["kind"] == "lead_will_stop":
                assert (q["answer"] == "A") == (scene["traffic_light"]["colour"] != "green")
            elif q["kind"] == "ego_action":
                assert chosen == ACTION_TEXT[scene["ego_action"]]
                assert (scene["ego_action"] == "stop") == (scene["traffic_light"]["colour"] == "red")
            elif q["kind"] == "pedestrian_count":
                front = scene["views"]["CAM_FRONT"]["objects"]
                n = sum(1 for o in scene["objects"] if o["kind"] == "pedestrian" and o["oid"] in front
                        and front[o["oid"]]["in_frame"] and front[o["oid"]]["visible"] >= 0.5)
                assert q["answer"] == str(n)
            checked[q["kind"]] += 1
    assert len(checked) >= 8, checked


def test_cli_writes_the_set_and_prints_one_line(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data_cli", REPO / "tools" / "make_demo_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    runner = CliRunner()
    res = runner.invoke(cli.main, ["--out", str(tmp_path / "d"), "--groups", "3", "--six-view-fraction", "0",
                                   "--questions-per-group", "2", "--size", "160x96"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) == 1 and "3 groups (0 six-view)" in res.output
    samples = load_samples(tmp_path / "d" / "drivebench.json")
    assert len(samples) == 6 and all(len(s.images) == 1 for s in samples)
    with Image.open(samples[0].images[0]) as im:
        assert im.size == (160, 96)
    bad = runner.invoke(cli.main, ["--out", str(tmp_path / "e"), "--size", "wide"])
    assert bad.exit_code == 2 and "--size" in bad.output
