"""DriveLM (nuScenes) and RoboSense 2025 Track 1 loaders: shapes, the category mapping, camera order,
ids, the `../nuscenes/` prefix under --images, every malformed record named, and training from a
DriveLM file end to end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from drivekd.data import CAMERA_ORDER, load_samples, load_samples_report
from drivekd.errors import DataError

SCENE_A, SCENE_B = "scene-a0", "scene-b1"
FRAME_A1, FRAME_A2, FRAME_B1 = "fa1", "fa2", "fb1"


def png(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), colour).save(path)
    return path


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def cams(frame: str, names=("CAM_BACK", "CAM_FRONT")) -> dict[str, str]:
    # Written back before front on purpose: the loader must order them by CAMERA_ORDER.
    return {c: f"../nuscenes/samples/{c}/{frame}.png" for c in names}


def drivelm() -> dict:
    """Two scenes, three frames, every category, DriveLM's own `../nuscenes/` image paths."""
    return {
        SCENE_A: {
            "scene_description": "a junction",
            "key_frames": {
                FRAME_A1: {
                    "QA": {
                        "perception": [{"Q": "What is in front?", "A": "A car.", "tag": [0]},
                                       {"Q": "Is the light red?", "A": "Yes.", "tag": [0]}],
                        "prediction": [{"Q": "Will the car turn?", "A": "No.", "tag": [1]}],
                        "planning": [{"Q": "What should the ego do?", "A": "Slow down.", "tag": [2]}],
                        "behavior": [{"Q": "What is the ego doing?", "A": "Going straight.", "tag": [3]}],
                    },
                    "image_paths": cams(FRAME_A1),
                },
                FRAME_A2: {
                    "QA": {"perception": [{"Q": "What is in front?", "A": "A bus."}], "planning": []},
                    "image_paths": cams(FRAME_A2),
                },
            },
        },
        SCENE_B: {
            "key_frames": {
                FRAME_B1: {
                    "QA": {"behavior": [{"Q": "What is the ego doing?", "A": "Stopped.", "tag": 3}]},
                    "image_paths": cams(FRAME_B1, CAMERA_ORDER[::-1]),
                },
            },
        },
    }


def robosense() -> list[dict]:
    """The same kind of questions as a flat RoboSense list (img_paths relative to the image root)."""
    def rec(frame, q, a, cat, scene=SCENE_A):
        return {"scene_token": scene, "frame_token": frame, "question": q, "answer": a, "category": cat,
                "img_paths": {c: f"samples/{c}/{frame}.png" for c in ("CAM_BACK", "CAM_FRONT")}}
    return [rec(FRAME_A1, "What is in front?", "A car.", "perception"),
            rec(FRAME_A1, "Will the car turn?", "No.", "prediction"),
            rec(FRAME_A1, "What should the ego do?", "Slow down.", "planning"),
            rec(FRAME_A2, "What is the ego doing?", "Going straight.", "behavior")]


@pytest.fixture
def root(tmp_path) -> Path:
    """A nuScenes-like image root: <root>/samples/CAM_*/<frame>.png for every fixture frame. Not named
    `nuscenes`: from a folder of that name `../nuscenes/` would land inside it without any mapping."""
    r = tmp_path / "nusc-images"
    for i, frame in enumerate((FRAME_A1, FRAME_A2, FRAME_B1)):
        for c in CAMERA_ORDER:
            png(r / "samples" / c / f"{frame}.png", (40 * i, 10, 10))
    return r


@pytest.fixture
def lm_file(tmp_path) -> Path:
    # As DriveLM ships: the JSON in its own folder beside nuscenes/.
    return write(tmp_path / "drivelm" / "train.json", drivelm())


# ------------------------------------------------------------------------------------------ DriveLM


def test_drivelm_one_sample_per_qa_with_mapping_cameras_and_source(lm_file, root):
    rep = load_samples_report(lm_file, root)
    assert rep.format == "drivelm"
    s = rep.samples
    assert [x.question for x in s] == ["What is in front?", "Is the light red?", "Will the car turn?",
                                       "What should the ego do?", "What is the ego doing?", "What is in front?",
                                       "What is the ego doing?"]
    assert [x.capability for x in s] == ["perception", "perception", "reasoning", "planning", "reasoning",
                                         "perception", "reasoning"]
    assert [x.question_type for x in s][:5] == ["perception", "perception", "prediction", "planning", "behavior"]
    assert {x.source for x in s} == {"drivelm"}
    assert s[0].answer == "A car."
    # ../nuscenes/samples/... lands under the image root, cameras in CAMERA_ORDER.
    assert s[0].images == (root / "samples" / "CAM_FRONT" / f"{FRAME_A1}.png",
                           root / "samples" / "CAM_BACK" / f"{FRAME_A1}.png")
    assert s[-1].images == tuple(root / "samples" / c / f"{FRAME_B1}.png" for c in CAMERA_ORDER)
    # The flat record keeps scene, frame, category and the QA fields for exporters.
    assert s[0].record["scene_token"] == SCENE_A and s[0].record["frame_token"] == FRAME_A1
    assert s[0].record["category"] == "perception" and s[0].record["tag"] == [0]
    # Same question in two frames: two ids.
    assert s[0].id != s[5].id and s[4].id != s[6].id
    assert len({x.id for x in s}) == len(s)


def test_drivelm_ids_stable_under_reordering(tmp_path, root):
    base = {x.question + x.answer: x.id for x in load_samples(write(tmp_path / "a.json", drivelm()), root)}
    data = drivelm()
    shuffled = {}
    for scene in reversed(list(data)):
        sv = copy.deepcopy(data[scene])
        frames = list(sv["key_frames"].items())[::-1]
        for _, fv in frames:
            fv["QA"] = dict(reversed(list(fv["QA"].items())))
            for items in fv["QA"].values():
                random.Random(0).shuffle(items)
        sv["key_frames"] = dict(frames)
        shuffled[scene] = sv
    again = load_samples(write(tmp_path / "b.json", shuffled), root)
    assert [x.question for x in again][0] == "What is the ego doing?"  # the order did change
    assert {x.question + x.answer: x.id for x in again} == base


def test_nuscenes_prefix_maps_only_that_prefix(tmp_path, root):
    data = drivelm()
    # Without the mapping this `../nuscenes/` path would climb out of --images and be refused.
    assert load_samples(write(tmp_path / "d" / "ok.json", data), root)
    other = copy.deepcopy(data)
    other[SCENE_B]["key_frames"][FRAME_B1]["image_paths"]["CAM_FRONT"] = f"../elsewhere/samples/CAM_FRONT/{FRAME_B1}.png"
    png(root.parent / "elsewhere" / "samples" / "CAM_FRONT" / f"{FRAME_B1}.png")
    f = write(tmp_path / "d" / "other.json", other)
    with pytest.raises(DataError, match=r"scene 'scene-b1', frame 'fb1', QA.behavior\[0\].*field "
                                        r"`image_paths.CAM_FRONT`.*outside the image root"):
        load_samples(f, root)
    assert len(load_samples(f, root, allow_outside_images=True)) == 7


def test_drivelm_missing_images_point_at_images_flag(lm_file):
    # No --images: the root is the JSON's folder, which holds no samples/.
    with pytest.raises(DataError, match=r"does not exist.*--images is the folder holding samples/"):
        load_samples(lm_file)


def _bad(mutate, data=None):
    data = data or drivelm()
    mutate(data)
    return data


def _frame(d, scene=SCENE_A, frame=FRAME_A1):
    return d[scene]["key_frames"][frame]


BAD_DRIVELM = [
    (lambda d: _frame(d)["QA"]["perception"][0].pop("Q"),
     r"scene 'scene-a0', frame 'fa1', QA.perception\[0\], field `Q`: missing"),
    (lambda d: _frame(d)["QA"]["planning"][0].pop("A"),
     r"scene 'scene-a0', frame 'fa1', QA.planning\[0\], field `A`: missing"),
    (lambda d: _frame(d)["QA"]["perception"][1].update(A=3),
     r"QA.perception\[1\], field `A`: is a number, expected a string"),
    (lambda d: _frame(d)["QA"]["perception"][1].update(Q="  "), r"QA.perception\[1\], field `Q`: is empty"),
    (lambda d: _frame(d)["QA"]["prediction"].__setitem__(0, "Will it turn?"),
     r"QA.prediction\[0\], field `<QA entry>`: is a string, expected an object"),
    (lambda d: _frame(d).update(QA=["x"]), r"scene 'scene-a0', frame 'fa1', field `QA`: is a list"),
    (lambda d: _frame(d).pop("QA"), r"frame 'fa1', field `QA`: missing"),
    (lambda d: _frame(d)["QA"].update(perception={"Q": "x", "A": "y"}),
     r"frame 'fa1', field `QA.perception`: is a object, expected a list"),
    (lambda d: _frame(d)["QA"].update(trivia=[{"Q": "x?", "A": "y"}]),
     r"QA.trivia\[0\], field `<category>`: unknown category 'trivia'"),
    (lambda d: _frame(d).update(image_paths={}), r"QA.perception\[0\], field `image_paths`: is an empty object"),
    (lambda d: _frame(d).pop("image_paths"), r"QA.perception\[0\], field `image_paths`: missing"),
    (lambda d: _frame(d)["image_paths"].update(CAM_FRONT=None), r"field `image_paths.CAM_FRONT`: is None"),
    (lambda d: _frame(d)["QA"]["behavior"][0].update(tag="x"), r"QA.behavior\[0\], field `tag`: is 'x'"),
    (lambda d: d[SCENE_B].pop("key_frames"), r"scene 'scene-b1', field `key_frames`: missing"),
    (lambda d: d[SCENE_B].update(key_frames=[]), r"scene 'scene-b1', field `key_frames`: is a list"),
    (lambda d: d.update({"scene-c": 7}), r"scene 'scene-c', field `<scene>`: is a number"),
    (lambda d: d[SCENE_A]["key_frames"].update(fa3="x"), r"frame 'fa3', field `<frame>`: is a string"),
    (lambda d: _frame(d)["QA"]["perception"].append({"Q": "What is in front?", "A": "Another car."}),
     r"QA.perception\[2\].*field `id`: same id as scene 'scene-a0', frame 'fa1', QA.perception\[0\]; "
     r"the two records have the same question twice about one frame"),
]


@pytest.mark.parametrize("mutate,message", BAD_DRIVELM)
def test_drivelm_malformed_named(tmp_path, root, mutate, message):
    f = write(tmp_path / "bad.json", _bad(mutate))
    with pytest.raises(DataError, match=message) as e:
        load_samples(f, root)
    assert str(f) in str(e.value)


def test_drivelm_every_problem_listed_at_once(tmp_path, root):
    def mutate(d):
        _frame(d)["QA"]["perception"][0].pop("Q")
        _frame(d, frame=FRAME_A2).update(image_paths={})
        d[SCENE_B]["key_frames"][FRAME_B1].pop("QA")
    with pytest.raises(DataError) as e:
        load_samples(write(tmp_path / "bad.json", _bad(mutate)), root)
    msg = str(e.value)
    assert "3 bad record(s) in drivelm file" in msg
    assert "QA.perception[0], field `Q`" in msg and "frame 'fa2', QA.perception[0], field `image_paths`" in msg
    assert "frame 'fb1', field `QA`: missing" in msg


def test_drivelm_unknown_category_can_be_skipped(tmp_path, root):
    data = _bad(lambda d: _frame(d)["QA"].update(trivia=[{"Q": "x?", "A": "y"}]))
    rep = load_samples_report(write(tmp_path / "t.json", data), root, unknown_capability="skip")
    assert len(rep.samples) == 7 and [s.label for s in rep.skipped] == ["trivia"]


# ---------------------------------------------------------------------------------------- RoboSense


def test_robosense_records_and_shared_ids(tmp_path, root):
    f = write(tmp_path / "rs.json", robosense())
    rep = load_samples_report(f, root)
    assert rep.format == "robosense"
    s = rep.samples
    assert [x.capability for x in s] == ["perception", "reasoning", "planning", "reasoning"]
    assert {x.source for x in s} == {"robosense"}
    assert s[0].images == (root / "samples" / "CAM_FRONT" / f"{FRAME_A1}.png",
                           root / "samples" / "CAM_BACK" / f"{FRAME_A1}.png")
    # One question about one frame has one id in both formats (RoboSense is built on DriveLM).
    lm = {(x.record["frame_token"], x.question): x.id for x in load_samples(write(tmp_path / "lm.json", drivelm()), root)}
    for x in s[:3]:
        assert lm[(x.record["frame_token"], x.question)] == x.id
    # Reordering keeps every id.
    shuffled = robosense()[::-1]
    assert {x.question: x.id for x in load_samples(write(tmp_path / "rs2.json", shuffled), root)} == \
        {x.question: x.id for x in s}


def test_robosense_nuscenes_prefix_maps_too(tmp_path, root):
    recs = robosense()
    for r in recs:
        r["img_paths"] = {c: "../nuscenes/" + p for c, p in r["img_paths"].items()}
    s = load_samples(write(tmp_path / "rs.json", recs), root)
    assert s[0].images[0] == root / "samples" / "CAM_FRONT" / f"{FRAME_A1}.png"


BAD_ROBOSENSE = [
    (lambda r: r[1].pop("question"), r"record 1, field `question`: missing"),
    (lambda r: r[2].pop("answer"), r"record 2, field `answer`: missing"),
    (lambda r: r[0].update(category="trivia"), r"record 0, field `category`: unknown category 'trivia'"),
    (lambda r: r[0].pop("category"), r"record 0, field `category`: missing"),
    (lambda r: r[3].update(img_paths={}), r"record 3, field `img_paths`: is an empty object"),
    (lambda r: r[3].update(img_paths=["a.png"]), r"record 3, field `img_paths`: is a list"),
    (lambda r: r[1].pop("frame_token"), r"record 1, field `frame_token`: missing"),
    (lambda r: r[1].update(scene_token=5), r"record 1, field `scene_token`: is a number"),
    (lambda r: r[2]["img_paths"].update(CAM_FRONT="samples/CAM_FRONT/nope.png"),
     r"record 2 \(id '.*'\), field `img_paths.CAM_FRONT`: image .* does not exist"),
    (lambda r: r.append(7), r"record 4, field `<record>`: is a int"),
]


@pytest.mark.parametrize("mutate,message", BAD_ROBOSENSE)
def test_robosense_malformed_named(tmp_path, root, mutate, message):
    recs = robosense()
    mutate(recs)
    f = write(tmp_path / "bad.json", recs)
    with pytest.raises(DataError, match=message) as e:
        load_samples(f, root)
    assert str(f) in str(e.value)


# ------------------------------------------------------------------------------------------ formats


def test_format_named_and_detected(tmp_path, root, lm_file):
    rs = write(tmp_path / "rs.json", robosense())
    assert load_samples_report(rs, root, format="robosense").format == "robosense"
    assert load_samples_report(lm_file, root, format="drivelm").format == "drivelm"
    with pytest.raises(DataError, match="a DriveLM file is one object"):
        load_samples(rs, root, format="drivelm")
    with pytest.raises(DataError, match="expected a list of records"):
        load_samples(lm_file, root, format="robosense")
    with pytest.raises(DataError, match="format must be 'auto' or one of drivekd, drivebench, drivelm, robosense"):
        load_samples(rs, root, format="nuscenes")


def test_detection_refuses_mixed_and_unknown_objects(tmp_path, root):
    bench = {"question": "q", "answer": "A", "question_type": "perception", "frame_token": "f",
             "image_path": {"CAM_FRONT": "samples/CAM_FRONT/fa1.png"}}
    with pytest.raises(DataError, match=r"mixes DriveBench records .*record 1.* RoboSense records .*record 0"):
        load_samples(write(tmp_path / "mix.json", [robosense()[0], bench]), root)
    with pytest.raises(DataError, match="no entry has `key_frames`"):
        load_samples(write(tmp_path / "obj.json", {"a": {"b": 1}}), root)
    with pytest.raises(DataError, match="no scenes"):
        load_samples(write(tmp_path / "empty.json", {}), root, format="drivelm")


# --------------------------------------------------------------------------------------- end to end


def test_train_from_drivelm_file(tiny_models, tmp_path, root, lm_file):
    from drivekd.cli.train import main as train_cli

    args = ["--recipe", "sft", "--student", str(tiny_models / "internvl-student"), "--data", str(lm_file),
            "--images", str(root), "--out", str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0",
            "--no-progress", "--report-to", "none"]
    r = CliRunner().invoke(train_cli, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "final").is_dir()
