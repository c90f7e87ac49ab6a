"""Each challenge's own submission layout: predictions written into it, read back, scored.

| format | file | layout (each record) | source |
|---|---|---|---|
| drivebench | predictions.json | the input record plus `pred` | worldbench/drivebench |
| drivelm | output.json | `{id: "<scene>_<frame>_<i>", question, answer: prediction}` | OpenDriveLab/DriveLM challenge/output.json, evaluation.py |
| robosense | results.json | the converted input record with `answer` = prediction | robosense2025/track1 README.md "Submission Packaging" |

DriveLM's leaderboard wraps output.json's list as `results` of a `submission.json` with team fields
(challenge/prepare_submission.py); `read_submission` reads either. A DriveLM or RoboSense submission
holds no reference answers, so scoring it needs the reference file (`--data`: the DriveLM QA file
with tags, or a RoboSense / DriveLM file with answers), matched by submission id (DriveLM) or by
scene, frame and question (RoboSense, `drivekd.ids.scene_frame_id`).

`drivekd.eval.report.score_submission` is the whole no-model path of `drivekd-eval score` on top of
this module: read the file (format detected from its shape or named; every record checked, the file,
record index and field named), join it with the reference, grade, score, write the reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from drivekd.errors import ConfigError, DataError
from drivekd.fileio import atomic_write_text
from drivekd.ids import scene_frame_id

FORMATS = ("drivebench", "drivelm", "robosense")
SUBMISSION_FILE = {"drivebench": "predictions.json", "drivelm": "output.json", "robosense": "results.json"}
_ROBOSENSE_KEYS = ("scene_token", "frame_token", "question", "answer", "category")
_JSON_TYPE = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
_DROP_ON_EXPORT = ("id", "pred", "question_type", "image_path", "drivelm_tag")  # drivekd's own fields


def check_format(fmt: str, flag: str = "--format") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"{flag} {fmt!r} is not a known format: use one of {', '.join(FORMATS)}")
    return fmt


def load_reference(data: str | Path, flag: str = "--data"):
    """The reference samples of a DriveLM / RoboSense (or DriveBench) file; images are not needed to score."""
    from drivekd.data.loaders import load_samples

    data = Path(data)
    if not data.is_file():
        raise ConfigError(f"{flag} {data} does not exist: give the reference file the predictions answer "
                          "(the DriveLM QA file with tags, or the RoboSense file with answers)")
    return load_samples(data, check_images=False, allow_outside_images=True)


# ------------------------------------------------------------------------------------------ export


def robosense_entry(sample, pred: str) -> dict[str, Any]:
    """The RoboSense results.json record of a sample: its converted record with `answer` = pred."""
    rec = sample.record
    if sample.source == "robosense":
        out = {k: v for k, v in rec.items() if k not in _DROP_ON_EXPORT}
    elif sample.source == "drivelm":
        out = {"scene_token": rec["scene_token"], "frame_token": rec["frame_token"], "question": rec["Q"],
               "answer": "", "category": rec["category"], "img_paths": dict(rec["image_paths"])}
    else:
        raise DataError(f"sample {sample.id} is a {sample.source} record: a RoboSense results.json is written from "
                        "DriveLM or RoboSense data (scene, frame, category); use --format drivebench for this data")
    out["answer"] = pred
    return out


def check_exportable(fmt: str, samples: Sequence[Any], where: str = "--data") -> None:
    """Refuse, before generation, samples that `fmt`'s layout cannot hold or its scorer cannot score."""
    check_format(fmt)
    if fmt == "drivebench":
        return
    other = next((s for s in samples if s.source not in ("drivelm", "robosense")), None)
    if other is not None:
        raise ConfigError(f"--format {fmt} needs DriveLM or RoboSense data (scene, frame, category), but {where} holds "
                          f"{other.source} records (e.g. {other.id}); use --format drivebench for it")
    if fmt == "drivelm" and not any("tag" in s.record for s in samples):
        raise ConfigError(f"--format drivelm scores by each question's DriveLM `tag`, and {where} has none (a RoboSense "
                          "file): evaluate the DriveLM QA file, or use --format robosense")


def export_predictions(fmt: str, samples: Sequence[Any], preds: Mapping[str, str], out_dir: str | Path) -> Path:
    """Write `preds` ({sample id: prediction}) in `fmt`'s submission layout into `out_dir`; returns the file.

    `samples` are all samples of the data file (DriveLM's submission ids count every question of a
    frame); those without a prediction (a --limit run) are left out. drivebench: predictions.json
    is what generation wrote already, returned as is.
    """
    check_format(fmt)
    out_dir = Path(out_dir)
    path = out_dir / SUBMISSION_FILE[fmt]
    if fmt == "drivebench":
        return path
    if fmt == "drivelm":
        from drivekd.eval.challenge import drivelm_questions

        entries = [{"id": q.challenge_id, "question": q.question, "answer": preds[q.sample_id]}
                   for q in drivelm_questions(samples) if q.sample_id in preds]
    else:
        entries = [robosense_entry(s, preds[s.id]) for s in samples if s.id in preds]
    if not entries:
        raise DataError(f"no prediction matches a sample of the data: nothing to export to {path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(entries, ensure_ascii=False, indent=2) + "\n")


# -------------------------------------------------------------------------------------------- read


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"predictions file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as e:
        raise DataError(f"predictions file {path} is not valid JSON ({e}); fix the syntax there") from None


def detect_format(path: Path, data: Any) -> str:
    """drivebench (records with `pred`), drivelm (output.json / submission.json) or robosense (results.json),
    from the shape of the file and its first record; anything else is read as drivebench, whose reader
    names the missing `pred`."""
    if isinstance(data, dict):
        if isinstance(data.get("results"), list):
            return "drivelm"  # submission.json
        raise DataError(f"{path}: a JSON object without a `results` list is no known predictions layout (a DriveLM "
                        "submission.json holds `results`; the others are lists of records); pass --format to say which")
    if not isinstance(data, list) or not data:
        what = "an empty list" if data == [] else f"a JSON {type(data).__name__}"
        raise DataError(f"{path}: is {what}; expected a list of prediction records")
    first = data[0]
    if not isinstance(first, dict):
        raise DataError(f"{path}: record 0 is a {type(first).__name__}, expected a JSON object")
    if "pred" in first or "question_type" in first or "image_path" in first:
        return "drivebench"
    if "img_paths" in first or ("scene_token" in first and "category" in first):
        return "robosense"
    if "id" in first and "answer" in first:
        return "drivelm"
    return "drivebench"  # its reader names what is missing (a record without `pred`)


def read_submission(path: str | Path, fmt: str = "auto") -> tuple[str, list[dict[str, Any]]]:
    """(format, records) of a predictions file, every record checked: a malformed one is a DataError
    naming the file, the record and the field (all of them, not only the first)."""
    path = Path(path)
    data = _read_json(path)
    fmt = detect_format(path, data) if fmt == "auto" else check_format(fmt)
    if fmt == "drivelm" and isinstance(data, dict):
        data = data.get("results")
    if not isinstance(data, list):
        raise DataError(f"{path}: a {fmt} predictions file holds a list of records, found a JSON {type(data).__name__}")
    if fmt == "drivebench":
        from drivekd.eval.predictions import read_predictions
        from drivekd.eval.score import check_records

        records = read_predictions(path)
        check_records(records, str(path))
        return fmt, records
    if data and isinstance(data[0], dict) and "pred" in data[0]:
        # drivekd's own predictions.json: its `answer` is the reference, so reading it as a submission
        # would score the references against themselves.
        raise DataError(f"{path}: holds records with `pred` (drivekd's DriveBench-style predictions.json), not a {fmt} "
                        f"submission; score its {SUBMISSION_FILE[fmt]} (written beside it by `drivekd-eval --format {fmt}`), "
                        "or score this file as --format drivebench")
    need = {"drivelm": ("id", "answer"), "robosense": _ROBOSENSE_KEYS}[fmt]
    problems = []
    seen: dict[Any, int] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            problems.append(f"record {i} is a {_JSON_TYPE.get(type(rec), 'value')}, expected a JSON object")
            continue
        for key in need:
            if key not in rec:
                problems.append(f"record {i}, field `{key}`: missing")
            elif not isinstance(rec[key], str):
                problems.append(f"record {i}, field `{key}`: is a {_JSON_TYPE.get(type(rec[key]), 'value')} {rec[key]!r:.40}, expected a string")
        key = (rec.get("id"),) if fmt == "drivelm" else tuple(rec.get(k) for k in ("scene_token", "frame_token", "question"))
        if not all(isinstance(k, str) for k in key):
            continue  # already named above
        if key in seen:
            problems.append(f"record {i}: answers the same question as record {seen[key]} (remove one)")
        else:
            seen[key] = i
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path}: {len(problems)} malformed {fmt} record(s), nothing was scored: {shown}")
    return fmt, data


# ------------------------------------------------------------------------------------------- score


def prediction_record(sample, pred: str | None = None) -> dict[str, Any]:
    """The DriveBench-style record (drivekd's predictions.json) of a DriveLM / RoboSense sample, with
    `pred` when given; scene, frame and category kept for the exporters and scorers."""
    from drivekd.eval.challenge import question_fields

    scene, frame, category, _, _, tags = question_fields(sample)
    rec = {"id": sample.id, "scene_token": scene, "frame_token": frame, "category": category,
           "question": sample.question, "answer": sample.answer, "question_type": category}
    cams = sample.record.get("image_paths", sample.record.get("img_paths"))
    if isinstance(cams, dict):
        rec["image_path"] = dict(cams)
    if pred is not None:
        rec["pred"] = pred
    if tags is not None:
        rec["drivelm_tag"] = list(tags)  # DriveLM's tags mean other things than DriveBench's `tag`
    return rec


def join_robosense(path: Path, entries: Sequence[Mapping[str, Any]], samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Internal records (reference + pred) of results.json entries, matched by scene, frame and question."""
    from drivekd.data.loaders import strip_image_tags

    by_id = {s.id: s for s in samples}
    out, problems = [], []
    for i, e in enumerate(entries):
        sid = scene_frame_id(e["scene_token"], e["frame_token"], strip_image_tags(e["question"]))
        if sid not in by_id:
            problems.append(f"record {i} (scene {e['scene_token']!r}, frame {e['frame_token']!r}): its question "
                            f"{e['question'][:60]!r} is not in the reference file")
            continue
        out.append(prediction_record(by_id[sid], e["answer"]))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{path}: {len(problems)} record(s) answer no question of --data ({shown}); do not alter the "
                        "`question` field, and check --data is the file the predictions were made for")
    return out
