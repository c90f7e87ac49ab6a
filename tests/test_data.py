"""Loaders for the Drive-KD and DriveBench formats: shapes, ids, aliases, and every bad-input case."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from drivekd.data import (
    CAMERA_ORDER,
    Sample,
    is_safe_key,
    load_samples,
    load_samples_report,
    normalize_capability,
    safe_key,
)
from drivekd.errors import DataError


def png(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)
    return path


def write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def kd(question="What colour is the light?", answer="Final: red\nSupport: lamp", images=("a.png",), label="perception",
       **extra) -> dict:
    rec = {
        "messages": [
            {"role": "user", "content": "<image>\n" * len(images) + question},
            {"role": "assistant", "content": answer},
        ],
        "images": list(images),
        "question_type": label,
    }
    rec.update(extra)
    return rec


def bench(question="Is the light red?", answer="A", qtype="perception", cams=("CAM_FRONT",), frame="f0", **extra):
    rec = {
        "scene_token": "s0", "frame_token": frame, "question_type": qtype, "question": question, "answer": answer,
        "tag": [0], "image_path": {c: f"{c}.png" for c in cams},
    }
    rec.update(extra)
    return rec


@pytest.fixture
def imgdir(tmp_path: Path) -> Path:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", (200, 0, 0))
    for c in CAMERA_ORDER + ("CAM_EXTRA",):
        png(tmp_path / f"{c}.png")
    return tmp_path


# ------------------------------------------------------------------------------- good input


def test_drivekd_messages_and_flat_forms(imgdir):
    path = write(imgdir / "train.json", [
        kd(images=("a.png", "b.png"), question="Which car is closer?"),
        {"question": "<image>Which car is closer?", "answer": "the red one", "images": ["a.png"], "type": "r"},
    ])
    s0, s1 = load_samples(path)
    assert isinstance(s0, Sample) and s0.source == "drivekd"
    assert s0.question == "Which car is closer?"  # tags and the newline after each removed
    assert s0.images == (imgdir / "a.png", imgdir / "b.png")
    assert s0.capability == "perception" and s0.question_type == "perception"
    assert s1.capability == "reasoning" and s1.question_type == "r" and s1.answer == "the red one"
    assert s0.record == json.loads(path.read_text())[0]


def test_authors_demo_record_shape(imgdir):
    # The structure of the authors' data/demo.json: tags without newlines, six images, answer template.
    rec = {
        "messages": [
            {"role": "user", "content": "<image>" * 6 + "Predict the behavior of the ego vehicle. A. x B. y"},
            {"role": "assistant", "content": "Final: C. slowly.  \nSupport: lane curves."},
        ],
        "images": [f"{c}.png" for c in CAMERA_ORDER],
        "question_type": "reasoning",
    }
    (s,) = load_samples(write(imgdir / "demo.json", [rec]))
    assert s.question == "Predict the behavior of the ego vehicle. A. x B. y"
    assert [p.name for p in s.images] == [f"{c}.png" for c in CAMERA_ORDER]


def test_both_formats_give_the_same_sample_shape(imgdir):
    (a,) = load_samples(write(imgdir / "kd.json", [kd(question="Is the light red?", answer="A",
                                                       images=("CAM_FRONT.png",))]))
    (b,) = load_samples(write(imgdir / "db.json", [bench()]))
    assert (a.capability, a.images, a.question, a.answer) == (b.capability, b.images, b.question, b.answer)
    assert (a.source, b.source) == ("drivekd", "drivebench")
    for s in (a, b):
        assert is_safe_key(s.id) and all(isinstance(p, Path) and p.is_absolute() for p in s.images)


@pytest.mark.parametrize("label,cap", [
    ("perception", "perception"), ("P", "perception"), ("per", "perception"), ("Perception", "perception"),
    ("r", "reasoning"), ("reason", "reasoning"), ("INFER", "reasoning"), ("inference", "reasoning"),
    ("prediction", "reasoning"), ("behavior", "reasoning"), ("behaviour", "reasoning"),
    ("d", "planning"), ("plan", "planning"), ("Planning", "planning"), ("decision", "planning"),
    ("motion-planning", "planning"), ("logical reasoning", "reasoning"),
])
def test_alias_mapping(imgdir, label, cap):
    assert normalize_capability(label) == cap
    (s,) = load_samples(write(imgdir / "t.json", [kd(label=label)]))
    assert s.capability == cap and s.question_type == label


@pytest.mark.parametrize("label", ["weather", "explanation", "x", ""])
def test_unknown_labels_are_not_guessed(label):
    assert normalize_capability(label) is None


def test_label_keys_type_and_capability(imgdir):
    r1, r2 = kd(question="q1"), kd(question="q2")
    del r1["question_type"], r2["question_type"]
    r1["type"], r2["capability"] = "plan", "p"
    a, b = load_samples(write(imgdir / "t.json", [r1, r2]))
    assert (a.capability, b.capability) == ("planning", "perception")


@pytest.mark.parametrize("qtype,cap", [("perception", "perception"), ("prediction", "reasoning"),
                                       ("behavior", "reasoning"), ("planning", "planning")])
def test_drivebench_mapping(imgdir, qtype, cap):
    (s,) = load_samples(write(imgdir / "db.json", [bench(qtype=qtype)]))
    assert s.capability == cap and s.question_type == qtype and s.source == "drivebench"


def test_drivebench_camera_order(imgdir):
    shuffled = ["CAM_BACK_RIGHT", "CAM_EXTRA", "CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT", "CAM_BACK_LEFT",
                "CAM_FRONT_RIGHT"]
    (s,) = load_samples(write(imgdir / "db.json", [bench(cams=shuffled)]))
    assert [p.stem for p in s.images] == list(CAMERA_ORDER) + ["CAM_EXTRA"]


def test_drivebench_single_camera(imgdir):
    (s,) = load_samples(write(imgdir / "db.json", [bench(cams=("CAM_BACK",))]))
    assert s.images == (imgdir / "CAM_BACK.png",)


def test_images_root(tmp_path):
    png(tmp_path / "pics" / "sub" / "a.png")
    (tmp_path / "json").mkdir()
    path = write(tmp_path / "json" / "t.json", [kd(images=("sub/a.png",))])
    with pytest.raises(DataError, match="images_root"):
        load_samples(path)  # default root: the JSON file's folder
    (s,) = load_samples(path, images_root=tmp_path / "pics")
    assert s.images == (tmp_path / "pics" / "sub" / "a.png",)
    # an absolute path outside the root is refused unless allowed; check_images=False accepts paths
    # that do not exist
    abs_path = write(tmp_path / "json" / "abs.json", [kd(images=(str(tmp_path / "pics" / "sub" / "a.png"),))])
    with pytest.raises(DataError, match=r"images\[0\]`: .* resolves to .*outside the image root /nonexistent.*--allow-outside-images"):
        load_samples(abs_path, images_root="/nonexistent")
    assert load_samples(abs_path, images_root="/nonexistent", allow_outside_images=True)[0].images == s.images
    assert load_samples(abs_path, images_root=tmp_path / "pics")[0].images == s.images  # absolute, inside: fine
    assert load_samples(abs_path)[0].images == s.images  # absolute with no root given: named on purpose
    assert load_samples(path, check_images=False)[0].images == (tmp_path / "json" / "sub" / "a.png",)


def test_image_paths_escaping_the_root_are_refused(tmp_path):
    # Once read without a word: `../x.png` and a DriveBench camera path reaching out of --images.
    png(tmp_path / "x.png")
    root = tmp_path / "root"
    png(root / "a.png")
    path = write(root / "t.json", [kd(images=("../x.png",)), kd(question="q2", images=("a.png",))])
    with pytest.raises(DataError, match=r"record 0 .*images\[0\]`: .../x.png. resolves to .*x.png, outside the image root"):
        load_samples(path)
    assert len(load_samples(path, allow_outside_images=True)) == 2
    db = write(root / "b.json", [bench(question="b1", image_path={"CAM_FRONT": "a.png", "CAM_BACK": "../x.png"})])
    with pytest.raises(DataError, match=r"image_path.CAM_BACK`: '../x.png' resolves to .*outside the image root"):
        load_samples(db)


def test_ids_differing_only_in_case_are_refused(imgdir):
    recs = [kd(question="q1", id="Scene-1"), kd(question="q2", id="scene-1")]
    with pytest.raises(DataError, match=r"record 1 .*differs only in case from the id 'Scene-1' of record 0"):
        load_samples(write(imgdir / "case.json", recs))


# ------------------------------------------------------------------------------------- ids


def test_ids_are_stable_under_shuffling_and_copying(imgdir):
    records = [kd(question=f"question {i}", label=random.Random(i).choice(["p", "r", "d"])) for i in range(12)]
    records += [bench(question=f"bench {i}", frame=f"frame{i % 3}") for i in range(6)]
    kd_recs, db_recs = records[:12], records[12:]
    ids_kd = {s.question: s.id for s in load_samples(write(imgdir / "a.json", kd_recs))}
    ids_db = {s.question: s.id for s in load_samples(write(imgdir / "b.json", db_recs))}
    rng = random.Random(0)
    rng.shuffle(kd_recs)
    rng.shuffle(db_recs)
    (imgdir / "other").mkdir()
    for p in ("a.png",) + tuple(f"{c}.png" for c in CAMERA_ORDER):
        png(imgdir / "other" / p)
    assert {s.question: s.id for s in load_samples(write(imgdir / "other" / "a.json", kd_recs))} == ids_kd
    assert {s.question: s.id for s in load_samples(write(imgdir / "other" / "b.json", db_recs))} == ids_db
    assert len(set(ids_kd.values())) == 12 and len(set(ids_db.values())) == 6
    assert all(i.startswith("frame") for i in ids_db.values())
    assert all(is_safe_key(i) for i in list(ids_kd.values()) + list(ids_db.values()))


def test_id_depends_on_content_not_form(imgdir):
    flat = {"question": "<image>What?", "answer": "Final: x", "images": ["a.png"], "question_type": "perception"}
    base = kd(question="What?", answer="Final: x")
    changed = [kd(question="What else?", answer="Final: x"), kd(question="What?", answer="Final: y"),
               kd(question="What?", answer="Final: x", images=("b.png",)), kd(question="What?", answer="Final: x",
                                                                              label="planning")]
    samples = load_samples(write(imgdir / "t.json", [base] + changed))
    (flat_s,) = load_samples(write(imgdir / "flat.json", [flat]))
    assert flat_s.id == samples[0].id  # same content in either form -> same id
    assert len({s.id for s in samples}) == len(samples)


def test_explicit_ids_kept_or_sanitised(imgdir):
    raw = ["ok-id.1", "a/b", "a_b", "../up", "..", ".hidden", "a\\b", "a b", "x" * 300, 17]
    recs = [kd(question=f"q{i}", id=r) for i, r in enumerate(raw)]
    samples = load_samples(write(imgdir / "t.json", recs))
    ids = [s.id for s in samples]
    assert ids[0] == "ok-id.1" and ids[2] == "a_b" and ids[-1] == "17"
    assert all(is_safe_key(i) for i in ids), ids
    assert len(set(ids)) == len(ids)  # "a/b" does not collide with "a_b"
    for i in ids:
        assert "/" not in i and "\\" not in i and ".." not in i and not i.startswith(".") and len(i) <= 128
    assert [safe_key(str(r)) for r in raw] == ids  # deterministic


def test_drivebench_explicit_and_unsafe_frame_tokens(imgdir):
    a, b = load_samples(write(imgdir / "db.json", [bench(id="my id"), bench(question="q2", frame="../f")]))
    assert is_safe_key(a.id) and a.id.startswith("my_id-")
    assert is_safe_key(b.id) and ".." not in b.id


# ------------------------------------------------------------------------------- bad input


def _no_images(r):
    del r["images"]


def _no_question(r):
    del r["question"]


def _no_label(r):
    del r["question_type"]


def _images_str(r):
    r["images"] = "a.png"


def _content_int(r):
    r["messages"][1]["content"] = 5


def _tag_str(r):
    r["tag"] = "zero"


def _image_path_list(r):
    r["image_path"] = ["a.png"]


def _two_tags(r):
    r["messages"][0]["content"] = "<image><image>What?"


def _unknown(r):
    r["question_type"] = "weather"


def _unknown_bench(r):
    r["question_type"] = "counting"


def _empty_answer(r):
    r["messages"][1]["content"] = "  \n "


def _empty_bench_answer(r):
    r["answer"] = " "


def _missing_image(r):
    r["images"] = ["nope.png"]


def _broken_image(r):
    r["images"] = ["broken.png"]


def _missing_cam(r):
    r["image_path"]["CAM_BACK"] = "nope.png"


def _no_messages(r):
    del r["messages"]


def _no_assistant(r):
    r["messages"] = r["messages"][:1]


BAD = [  # (fmt, mutate, field that the message must name)
    ("kd", _no_images, "`images`"),
    ("kd", _no_label, "`question_type`"),
    ("kd", _no_messages, "`messages`"),
    ("kd", _no_assistant, "`messages`"),
    ("kd", _images_str, "`images`"),
    ("kd", _content_int, "`messages[1].content`"),
    ("kd", _two_tags, "`messages[0].content`"),
    ("kd", _unknown, "`question_type`"),
    ("kd", _empty_answer, "`messages[1].content`"),
    ("kd", _missing_image, "`images[0]`"),
    ("kd", _broken_image, "`images[0]`"),
    ("db", _no_question, "`question`"),
    ("db", _tag_str, "`tag`"),
    ("db", _image_path_list, "`image_path`"),
    ("db", _unknown_bench, "`question_type`"),
    ("db", _empty_bench_answer, "`answer`"),
    ("db", _missing_cam, "`image_path.CAM_BACK`"),
]


@pytest.mark.parametrize("fmt,mutate,field", BAD, ids=[m.__name__.strip("_") for _, m, _ in BAD])
def test_bad_record_names_file_index_id_and_field(imgdir, fmt, mutate, field):
    (imgdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good, bad = (kd(question="fine"), kd(id="rec-7")) if fmt == "kd" else (bench(question="fine"), bench(id="rec-7"))
    mutate(bad)
    path = write(imgdir / f"bad_{fmt}.json", [good, bad])
    with pytest.raises(DataError) as e:
        load_samples(path)
    msg = str(e.value)
    assert "bad_" in msg and str(path) in msg
    assert "record 1" in msg and "rec-7" in msg
    assert field in msg, msg


def test_problems_in_several_records_are_listed_together(imgdir):
    recs = [kd(question="ok"), kd(question="a", images=("x.png",)), kd(question="b", label="zzz")]
    with pytest.raises(DataError) as e:
        load_samples(write(imgdir / "t.json", recs))
    msg = str(e.value)
    assert "2 bad record(s)" in msg and "record 1" in msg and "record 2" in msg


def test_missing_image_message_names_derived_id(imgdir):
    path = write(imgdir / "t.json", [kd(images=("nope.png",))])
    with pytest.raises(DataError, match=r"record 0 \(id 'dk-[0-9a-f]{16}'\), field `images\[0\]`.*does not exist"):
        load_samples(path)


def test_shared_image_is_checked_once(imgdir, monkeypatch):
    import drivekd.data.loaders as loaders

    calls = []
    real = loaders._image_problem
    monkeypatch.setattr(loaders, "_image_problem", lambda p: calls.append(p) or real(p))
    load_samples(write(imgdir / "t.json", [kd(question=f"q{i}") for i in range(5)]))
    assert calls == [imgdir / "a.png"]


def test_duplicate_ids_name_both_records(imgdir):
    path = write(imgdir / "dup.json", [kd(), kd(question="other"), kd()])
    with pytest.raises(DataError) as e:
        load_samples(path)
    msg = str(e.value)
    assert "dup.json" in msg and "record 2" in msg and "record 0" in msg and "`id`" in msg
    path = write(imgdir / "dup2.json", [kd(question="a", id="same"), kd(question="b", id="same")])
    with pytest.raises(DataError, match=r"record 1 \(id 'same'\), field `id`: same id as record 0"):
        load_samples(path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question": "x",\n   "answer": }\n]')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 3, column 14"):
        load_samples(path)


@pytest.mark.parametrize("content,match", [
    ('{"data": []}', "top level is a JSON object"),
    ("[]", "empty"),
    ('[1, 2]', r"record 0, field `<record>`"),
])
def test_bad_top_level(tmp_path, content, match):
    path = tmp_path / "top.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        load_samples(path)
    assert "top.json" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_samples(tmp_path / "absent.json")


def test_mixed_formats_rejected(imgdir):
    with pytest.raises(DataError, match="mixes DriveBench records"):
        load_samples(write(imgdir / "mix.json", [kd(), bench()]))


def test_skip_mode_drops_and_reports_unknown_labels(imgdir, caplog):
    path = write(imgdir / "t.json", [kd(question="a"), kd(question="b", label="weather"), kd(question="c"),
                                     kd(question="d", label="counting")])
    with caplog.at_level("WARNING"):
        report = load_samples_report(path, unknown_capability="skip")
    assert [s.question for s in report.samples] == ["a", "c"]
    assert report.n_skipped == 2 and [(k.index, k.label) for k in report.skipped] == [(1, "weather"), (3, "counting")]
    assert "skipped 2 record(s)" in caplog.text
    assert [s.question for s in load_samples(path, unknown_capability="skip")] == ["a", "c"]
    with pytest.raises(DataError, match="drop such records from the file"):
        load_samples(path)
