"""Read Drive-KD, DriveBench, DriveLM and RoboSense JSON files into `Sample`s (METHOD.md section 1).

The format is detected per file (or named with `format=`):

* Drive-KD (the authors' `data/demo.json`): `messages` (user turn with one `<image>` tag per image,
  assistant turn = answer) or flat `question`/`answer`; `images`; the capability label under
  `question_type`, `type` or `capability`, with aliases (see `CAPABILITY_ALIASES`).
* DriveBench: `scene_token`, `frame_token`, `question_type` (perception|prediction|planning|behavior),
  `question`, `answer`, `tag`, `image_path` {camera: path}. Images are ordered by `CAMERA_ORDER`.
* DriveLM (nuScenes): one JSON object `{scene_token: {key_frames: {frame_token: {QA: {category:
  [{Q, A, tag}]}, image_paths: {camera: path}}}}`; one Sample per QA entry.
* RoboSense 2025 Track 1: a list of `{scene_token, frame_token, question, answer, category,
  img_paths: {camera: path}}`; one Sample per record.

DriveLM and RoboSense categories map to capabilities as the paper groups them: perception ->
perception, prediction and behavior -> reasoning, planning -> planning (any other category is a
bad record, or skipped with unknown_capability="skip"). Their images are ordered by
`CAMERA_ORDER`, and DriveLM's own image paths, written `../nuscenes/samples/CAM_*/...` relative to
its data folder, have that `../nuscenes/` prefix mapped onto the image root (the folder holding
`samples/`), so they are not refused as escaping it.

Sample ids come from `drivekd.ids` (explicit `id` field, else a content hash, or scene, frame and
question for DriveLM/RoboSense; never list position).

Every problem raises `DataError` naming the file, the record (index and id when known; scene, frame
and QA entry for DriveLM), the field, and what to do. All records are checked before raising, so one
run lists every problem (the first `MAX_LISTED_PROBLEMS` are shown).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from drivekd.data.sample import CAMERA_ORDER, Sample
from drivekd.errors import DataError
from drivekd.ids import drivebench_id, drivekd_id, explicit_id, scene_frame_id

log = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
# A tag plus the spaces and the one newline right after it (the authors write "<image>\n...").
_TAG_RE = re.compile(r"<image>[ \t]*(?:\r?\n)?")

MAX_LISTED_PROBLEMS = 20

# Label aliases (case-insensitive; '-' and ' ' read as '_'). The reference trainer's table plus the
# DriveBench question types (prediction and behavior are reasoning, as in the paper).
CAPABILITY_ALIASES: dict[str, str] = {
    **dict.fromkeys(("perception", "perceptual", "perceive", "percep", "perc", "per", "p"), "perception"),
    **dict.fromkeys(
        ("reasoning", "reason", "logical_reasoning", "infer", "inference", "r",
         "prediction", "predict", "behavior", "behaviour"),
        "reasoning",
    ),
    **dict.fromkeys(("planning", "plan", "pl", "d", "decision", "decision_making"), "planning"),
}
# Fallback for compound labels ("motion_planning", "ego_behavior"): a '_'-separated word that starts
# with one of these. Whole words only, so e.g. "explanation" is not read as planning.
_ALIAS_PREFIXES = (
    ("percep", "perception"), ("reason", "reasoning"), ("predict", "reasoning"),
    ("behav", "reasoning"), ("infer", "reasoning"), ("plan", "planning"), ("decision", "planning"),
)
DRIVEBENCH_TYPES = ("perception", "prediction", "planning", "behavior")
_LABEL_KEYS = ("question_type", "type", "capability")
# DriveLM / RoboSense category -> capability (exact names, case-insensitive; nothing else is read).
DRIVELM_CATEGORIES: dict[str, str] = {
    "perception": "perception", "prediction": "reasoning", "behavior": "reasoning", "planning": "planning",
}
# DriveLM writes image paths relative to its own data folder, beside a `nuscenes/` checkout.
NUSCENES_PREFIX = "../nuscenes/"

Format = Literal["auto", "drivekd", "drivebench", "drivelm", "robosense"]
FORMATS = ("drivekd", "drivebench", "drivelm", "robosense")
# Where each format keeps its {camera: path} object (Drive-KD keeps a list under `images`).
_CAMERA_KEY = {"drivebench": "image_path", "drivelm": "image_paths", "robosense": "img_paths"}


def normalize_capability(label: str) -> str | None:
    """Map a capability label or alias to one of CAPABILITIES; None when it is not recognised."""
    s = label.strip().lower().replace("-", "_").replace(" ", "_")
    if s in CAPABILITY_ALIASES:
        return CAPABILITY_ALIASES[s]
    for word in s.split("_"):
        if word in CAPABILITY_ALIASES and len(word) > 2:
            return CAPABILITY_ALIASES[word]
        for prefix, cap in _ALIAS_PREFIXES:
            if word.startswith(prefix):
                return cap
    return None


def strip_image_tags(text: str) -> str:
    """The user text with every `<image>` tag (and the spaces/newline right after it) removed."""
    return _TAG_RE.sub("", text).strip()


@dataclass(frozen=True)
class SkippedRecord:
    """A record dropped by unknown_capability="skip"."""

    index: int  # the record's position in the file (DriveLM: the QA entry's, counted in file order)
    label: str  # the label as written


@dataclass(frozen=True)
class LoadReport:
    """What `load_samples_report` read from one file."""

    path: Path
    format: str  # one of FORMATS
    samples: list[Sample]
    skipped: tuple[SkippedRecord, ...] = ()

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


class _Problem(Exception):
    """One bad field in one record; collected and raised together as a DataError."""

    def __init__(self, field: str, message: str, sample_id: str | None = None):
        super().__init__(message)
        self.field, self.message, self.sample_id = field, message, sample_id


class _Skip(Exception):
    def __init__(self, label: str):
        self.label = label


def load_samples(
    path: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    *,
    unknown_capability: Literal["error", "skip"] = "error",
    check_images: bool = True,
    format: Format = "auto",
    allow_outside_images: bool = False,
) -> list[Sample]:
    """Read one Drive-KD, DriveBench, DriveLM or RoboSense JSON file; see `load_samples_report` for the arguments."""
    return load_samples_report(
        path, images_root, unknown_capability=unknown_capability, check_images=check_images, format=format,
        allow_outside_images=allow_outside_images,
    ).samples


def load_samples_report(
    path: str | os.PathLike,
    images_root: str | os.PathLike | None = None,
    *,
    unknown_capability: Literal["error", "skip"] = "error",
    check_images: bool = True,
    format: Format = "auto",
    allow_outside_images: bool = False,
) -> LoadReport:
    """Read one JSON file into Samples, in file order, and report what was skipped.

    images_root: folder that relative image paths are relative to (default: the JSON file's folder).
    unknown_capability: "error" (default) raises on a label that maps to no capability; "skip" drops
        such records, logs how many, and lists them in `LoadReport.skipped`.
    check_images: open every image with PIL and verify it (each distinct path once).
    format: "auto" detects the format from the records; else "drivekd", "drivebench", "drivelm" or
        "robosense".
    allow_outside_images: accept image paths that escape the image root (a relative `../x.jpg`, or an
        absolute path outside an explicitly given `images_root`); refused by default, since such a
        path usually means a wrong root.
    """
    if unknown_capability not in ("error", "skip"):
        raise DataError(f"unknown_capability must be 'error' or 'skip', got {unknown_capability!r}")
    if format not in ("auto", *FORMATS):
        raise DataError(f"format must be 'auto' or one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    data = _read_json(path)
    fmt = _detect_format(path, data) if format == "auto" else format
    entries, problems = _entries(path, data, fmt)
    root = Path(os.path.abspath(images_root if images_root is not None else path.parent))
    parse = _PARSERS[fmt]
    image_cache: dict[Path, str | None] = {}

    samples: list[Sample] = []
    wheres: list[str] = []
    skipped: list[SkippedRecord] = []
    for index, (where, record) in enumerate(entries):
        try:
            if not isinstance(record, dict):
                raise _Problem("<record>", f"is a {type(record).__name__}, expected a JSON object; "
                               "every list entry must be one record {...}")
            sample = parse(record, root, unknown_capability)
            if not allow_outside_images:
                _check_inside(sample, record, fmt, root, images_root is not None)
            if check_images:
                _check_images(sample, record, fmt, image_cache)
        except _Skip as skip:
            skipped.append(SkippedRecord(index, skip.label))
            continue
        except _Problem as p:
            problems.append(_format_problem(where, p.sample_id or _explicit_id(record), p.field, p.message))
            continue
        samples.append(sample)
        wheres.append(where)

    same = ("the same question twice about one frame - remove the duplicate" if fmt in ("drivelm", "robosense")
            else "the same content or the same explicit `id` - remove the duplicate or give them distinct `id` fields")
    first: dict[str, int] = {}  # id -> position in samples
    folded: dict[str, int] = {}  # lower-cased id -> position: ids that differ only in case
    for k, (sample, where) in enumerate(zip(samples, wheres)):
        low = sample.id.lower()
        if sample.id not in first and low in folded:
            j = folded[low]
            problems.append(_format_problem(
                where, sample.id, "id",
                f"differs only in case from the id {samples[j].id!r} of {wheres[j]}; the two would "
                f"share one store folder on a case-insensitive disk (macOS, Windows): give them distinct `id` fields",
            ))
            continue
        folded.setdefault(low, k)
        if sample.id in first:
            problems.append(_format_problem(
                where, sample.id, "id", f"same id as {wheres[first[sample.id]]}; the two records have {same}",
            ))
        else:
            first[sample.id] = k

    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        head = f"{path}: {len(problems)} bad record(s) in {fmt} file"
        if len(problems) == 1:
            raise DataError(f"{path}: {problems[0]}")
        raise DataError(head + ":\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
    if skipped:
        log.warning("%s: skipped %d record(s) with an unknown capability label (%s)", path, len(skipped),
                    ", ".join(sorted({s.label for s in skipped})))
    return LoadReport(path=path, format=fmt, samples=samples, skipped=tuple(skipped))


# ----------------------------------------------------------------------------------------- file


def _read_json(path: Path) -> Any:
    """The file's JSON value: a list of records, or (DriveLM) one object keyed by scene token."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e}); pass a JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
            "fix the syntax there (a trailing comma or a missing quote is common)"
        ) from None
    return data


def _entries(path: Path, data: Any, fmt: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(where, record) pairs to parse, in file order, and the problems found above record level.
    `where` names the record in problem lines: "record 3", or scene/frame/QA entry for DriveLM."""
    if fmt == "drivelm":
        if not isinstance(data, dict):
            raise DataError(f"{path}: top level is a JSON {_json_type(data)}, but a DriveLM file is one object "
                            "{scene_token: {\"key_frames\": ...}}; check the file (or the format passed to load_samples)")
        if not data:
            raise DataError(f"{path}: the DriveLM object has no scenes; nothing to load")
        return _drivelm_entries(data)
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top level is a JSON {_json_type(data)}, expected a list of records "
            "([{...}, {...}]); wrap the records in a list"
        )
    if not data:
        raise DataError(f"{path}: the list of records is empty; nothing to load")
    return [(f"record {i}", r) for i, r in enumerate(data)], []


def _drivelm_entries(data: dict) -> tuple[list[tuple[str, Any]], list[str]]:
    """One entry per QA item, as a flat record {scene_token, frame_token, category, qa, image_paths};
    a scene, frame or QA group that is itself malformed is one problem line (its QAs cannot be read)."""
    entries: list[tuple[str, Any]] = []
    problems: list[str] = []

    def bad(where: str, field: str, message: str) -> None:
        problems.append(_format_problem(where, None, field, message))

    for scene, sv in data.items():
        where_s = f"scene {scene!r}"
        if not isinstance(sv, dict):
            bad(where_s, "<scene>", f"is a {_json_type(sv)}, expected an object with `key_frames`")
            continue
        frames = sv.get("key_frames")
        if not isinstance(frames, dict) or not frames:
            what = ("missing" if "key_frames" not in sv else "an empty object" if frames == {}
                    else f"a {_json_type(frames)}")
            bad(where_s, "key_frames", f"{'is ' if what != 'missing' else ''}{what}; "
                "expected an object {frame_token: {\"QA\": ..., \"image_paths\": ...}}")
            continue
        for frame, fv in frames.items():
            where_f = f"{where_s}, frame {frame!r}"
            if not isinstance(fv, dict):
                bad(where_f, "<frame>", f"is a {_json_type(fv)}, expected an object with `QA` and `image_paths`")
                continue
            qa = fv.get("QA")
            if not isinstance(qa, dict):
                what = "missing" if "QA" not in fv else f"is a {_json_type(qa)}"
                bad(where_f, "QA", f"{what}; expected an object {{category: [{{\"Q\": ..., \"A\": ...}}]}} "
                    "with categories perception, prediction, planning, behavior")
                continue
            for cat, items in qa.items():
                if not isinstance(items, list):
                    bad(where_f, f"QA.{cat}", f"is a {_json_type(items)}, expected a list of {{\"Q\", \"A\"}} objects")
                    continue
                for i, item in enumerate(items):
                    record = {"scene_token": scene, "frame_token": frame, "category": cat, "qa": item,
                              "image_paths": fv.get("image_paths"), "_has_image_paths": "image_paths" in fv}
                    entries.append((f"{where_f}, QA.{cat}[{i}]", record))
    return entries, problems


def _detect_format(path: Path, data: Any) -> str:
    if isinstance(data, dict):
        if any(isinstance(v, dict) and "key_frames" in v for v in data.values()):
            return "drivelm"
        raise DataError(
            f"{path}: top level is a JSON object but no entry has `key_frames` (the DriveLM layout "
            "{scene_token: {key_frames: ...}}); other formats are a list of records ([{...}, {...}])"
        )
    if not isinstance(data, list):
        return "drivekd"  # `_entries` names the problem
    marks = (("DriveBench", "drivebench", ("image_path",)), ("RoboSense", "robosense", ("img_paths",)),
             ("Drive-KD", "drivekd", ("messages", "images")))
    found = []
    for name, fmt, keys in marks:
        hits = [i for i, r in enumerate(data) if isinstance(r, dict) and any(k in r for k in keys)]
        if hits:
            found.append((name, fmt, keys, hits[0]))
    if len(found) > 1:
        (n1, _, k1, i1), (n2, _, k2, i2) = found[:2]
        raise DataError(
            f"{path}: mixes {n1} records ({'/'.join(f'`{k}`' for k in k1)}, e.g. record {i1}) and {n2} records "
            f"({'/'.join(f'`{k}`' for k in k2)}, e.g. record {i2}); put each format in its own file"
        )
    return found[0][1] if found else "drivekd"


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _format_problem(where: str, sample_id: str | None, field: str, message: str) -> str:
    who = where + (f" (id {sample_id!r})" if sample_id else "")
    return f"{who}, field `{field}`: {message}"


def _explicit_id(record: Any) -> str | None:
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and not isinstance(record["id"], bool):
        return str(record["id"])
    return None


# -------------------------------------------------------------------------------------- records


def _get_str(record: dict, key: str, *, how: str) -> str:
    if key not in record:
        raise _Problem(key, f"missing; {how}")
    v = record[key]
    if not isinstance(v, str):
        raise _Problem(key, f"is a {_json_type(v)}, expected a string; {how}")
    return v


def _explicit_safe_id(record: dict) -> str | None:
    if "id" not in record:
        return None
    v = record["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        raise _Problem("id", f"is {v!r}, expected a non-empty string; give a unique string id or drop "
                       "the field to derive one from the content")
    return explicit_id(v)


def _question_answer(raw_q: str, answer: str, q_field: str, a_field: str,
                     empty_question: str = "is empty; give the question text") -> str:
    """The question without its image tags; an empty question or answer is a problem of its field."""
    question = strip_image_tags(raw_q)
    if not question:
        raise _Problem(q_field, empty_question)
    if not answer.strip():
        raise _Problem(a_field, "is empty; give the reference answer (or drop the record)")
    return question


def _capability(label: str, field: str, unknown: str, how: str) -> str:
    cap = normalize_capability(label)
    if cap is None:
        if unknown == "skip":
            raise _Skip(label)
        raise _Problem(field, f"unknown capability label {label!r}; {how} "
                       "(or drop such records from the file)")
    return cap


def _resolve(root: Path, p: str) -> Path:
    return Path(os.path.normpath(p if os.path.isabs(p) else root / p))


def _resolve_nuscenes(root: Path, p: str) -> Path:
    """As `_resolve`, but DriveLM's `../nuscenes/samples/...` is read as `<root>/samples/...`."""
    return _resolve(root, p[len(NUSCENES_PREFIX):] if p.startswith(NUSCENES_PREFIX) else p)


def _camera_paths(record: dict, key: str) -> list[tuple[str, str]]:
    """The (camera, path) pairs of `record[key]`, in CAMERA_ORDER, then other cameras by name."""
    if key not in record:
        raise _Problem(key, "missing; give {\"CAM_FRONT\": path, ...}")
    paths = record[key]
    if not isinstance(paths, dict) or not paths:
        what = f"a {_json_type(paths)}" if not isinstance(paths, dict) else "an empty object"
        raise _Problem(key, f"is {what}, expected an object {{camera: path}}")
    for cam, p in paths.items():
        if not isinstance(p, str) or not p.strip():
            raise _Problem(f"{key}.{cam}", f"is {p!r}, expected a non-empty path string")
    cams = [c for c in CAMERA_ORDER if c in paths] + sorted(c for c in paths if c not in CAMERA_ORDER)
    return [(c, paths[c]) for c in cams]


def _category(label: Any, field: str, unknown: str) -> str:
    if not isinstance(label, str):
        raise _Problem(field, f"is a {_json_type(label)}, expected one of {', '.join(DRIVELM_CATEGORIES)}")
    cap = DRIVELM_CATEGORIES.get(label.strip().lower())
    if cap is None:
        if unknown == "skip":
            raise _Skip(label)
        raise _Problem(field, f"unknown category {label!r}; use one of {', '.join(DRIVELM_CATEGORIES)} "
                       "(or drop such records from the file)")
    return cap


def _check_tag(record: dict, field: str = "tag") -> None:
    if "tag" in record:
        tag = record["tag"]
        tags = tag if isinstance(tag, list) else [tag]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            raise _Problem(field, f"is {tag!r}, expected an integer or a list of integers (0..3)")


def _scene_sample(*, sid: str | None, scene: Any, frame: Any, raw_q: str, answer: str, q_field: str,
                  a_field: str, capability: str, label: str, cams: list[tuple[str, str]], root: Path,
                  record: dict, source: str) -> Sample:
    """A DriveLM or RoboSense Sample (the two differ only in where the fields are)."""
    for key, v in (("scene_token", scene), ("frame_token", frame)):
        if sid is None and not (isinstance(v, str) and v.strip()):
            what = "missing" if v is None else f"is {v!r}"
            raise _Problem(key, f"{what}; expected a string token (the sample id is derived from it)")
    question = _question_answer(raw_q, answer, q_field, a_field)
    if sid is None:
        sid = scene_frame_id(scene, frame, question)
    return Sample(
        id=sid,
        capability=capability,
        images=tuple(_resolve_nuscenes(root, p) for _, p in cams),
        question=question,
        answer=answer,
        question_type=label,
        record=record,
        source=source,
    )


def _parse_drivelm(entry: dict, root: Path, unknown: str) -> Sample:
    # `entry` comes from `_drivelm_entries`; fields are named as in the file, relative to the QA entry.
    qa = entry["qa"]
    if not isinstance(qa, dict):
        raise _Problem("<QA entry>", f"is a {_json_type(qa)}, expected an object {{\"Q\": ..., \"A\": ...}}")
    capability = _category(entry["category"], "<category>", unknown)
    raw_q = _get_str(qa, "Q", how="give the question text under `Q`")
    answer = _get_str(qa, "A", how="give the reference answer under `A`")
    _check_tag(qa)
    frame = {"image_paths": entry["image_paths"]} if entry["_has_image_paths"] else {}
    cams = _camera_paths(frame, "image_paths")
    # The flat record kept on the Sample (exporters write predictions back from it).
    record = {"scene_token": entry["scene_token"], "frame_token": entry["frame_token"],
              "category": entry["category"], **qa, "image_paths": dict(entry["image_paths"])}
    return _scene_sample(sid=None, scene=entry["scene_token"], frame=entry["frame_token"], raw_q=raw_q,
                         answer=answer, q_field="Q", a_field="A", capability=capability,
                         label=entry["category"], cams=cams, root=root, record=record, source="drivelm")


def _parse_robosense(record: dict, root: Path, unknown: str) -> Sample:
    raw_q = _get_str(record, "question", how="give the question text")
    answer = _get_str(record, "answer", how="give the reference answer (a letter for multiple choice)")
    if "category" not in record:
        raise _Problem("category", f"missing; use one of {', '.join(DRIVELM_CATEGORIES)}")
    label = record["category"]
    capability = _category(label, "category", unknown)
    cams = _camera_paths(record, "img_paths")
    _check_tag(record)
    for key in ("scene_token", "frame_token"):
        if key in record and not isinstance(record[key], str):
            raise _Problem(key, f"is a {_json_type(record[key])}, expected a string token")
    return _scene_sample(sid=_explicit_safe_id(record), scene=record.get("scene_token"),
                         frame=record.get("frame_token"), raw_q=raw_q, answer=answer, q_field="question",
                         a_field="answer", capability=capability, label=label, cams=cams, root=root,
                         record=record, source="robosense")


def _parse_drivekd(record: dict, root: Path, unknown: str) -> Sample:
    # Question and answer: flat keys win when both are strings (as in the reference loader).
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        raw_q, answer, q_field, a_field = record["question"], record["answer"], "question", "answer"
    elif "messages" in record:
        raw_q, answer, q_field, a_field = _from_messages(record["messages"])
    elif "question" in record or "answer" in record:
        how = "give both `question` and `answer` as strings (or `messages`)"
        raw_q, answer = _get_str(record, "question", how=how), _get_str(record, "answer", how=how)
        q_field, a_field = "question", "answer"
    else:
        raise _Problem("messages", "missing (and no flat `question`/`answer`); give `messages` with a user "
                       "and an assistant turn, or `question` and `answer`")

    if "images" not in record:
        raise _Problem("images", "missing; list the image paths, one per `<image>` tag")
    images = record["images"]
    if not isinstance(images, list):
        raise _Problem("images", f"is a {_json_type(images)}, expected a list of image paths")
    if not images:
        raise _Problem("images", "is an empty list; list the image paths, one per `<image>` tag")
    for i, p in enumerate(images):
        if not isinstance(p, str) or not p.strip():
            raise _Problem(f"images[{i}]", f"is {p!r}, expected a non-empty path string")
    n_tags = raw_q.count(IMAGE_TAG)
    if n_tags != len(images):
        raise _Problem(q_field, f"has {n_tags} `<image>` tag(s) but `images` lists {len(images)} path(s); "
                       "put exactly one `<image>` tag per listed image in the user text")

    label_key = next((k for k in _LABEL_KEYS if k in record), None)
    if label_key is None:
        raise _Problem("question_type", "missing; label the record with `question_type` (or `type`, "
                       "`capability`) = perception, reasoning or planning")
    label = record[label_key]
    if not isinstance(label, str):
        raise _Problem(label_key, f"is a {_json_type(label)}, expected a string such as 'perception'")
    capability = _capability(label, label_key, unknown, "use perception, reasoning or planning")

    question = _question_answer(raw_q, answer, q_field, a_field,
                                empty_question="has no text besides the `<image>` tags; write the question after them")

    sid = _explicit_safe_id(record)
    if sid is None:
        sid = drivekd_id(list(images), question, answer, capability)
    return Sample(
        id=sid,
        capability=capability,
        images=tuple(_resolve(root, p) for p in images),
        question=question,
        answer=answer,
        question_type=label,
        record=record,
        source="drivekd",
    )


def _from_messages(messages: Any) -> tuple[str, str, str, str]:
    if not isinstance(messages, list):
        raise _Problem("messages", f"is a {_json_type(messages)}, expected a list of "
                       "{\"role\": ..., \"content\": ...} turns")
    found: dict[str, tuple[str, str]] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Problem(f"messages[{i}]", f"is a {_json_type(m)}, expected an object with `role` and `content`")
        role = m.get("role")
        if not isinstance(role, str):
            raise _Problem(f"messages[{i}].role", "missing or not a string; use 'user' or 'assistant'")
        role = role.strip().lower()
        if role in ("user", "assistant") and role not in found:
            content = m.get("content")
            if not isinstance(content, str):
                raise _Problem(f"messages[{i}].content", f"is a {_json_type(content)}, expected a string "
                               "(the text with `<image>` tags)")
            found[role] = (content, f"messages[{i}].content")
    for role in ("user", "assistant"):
        if role not in found:
            raise _Problem("messages", f"has no {role} turn; add {{\"role\": \"{role}\", \"content\": ...}}")
    (q, qf), (a, af) = found["user"], found["assistant"]
    return q, a, qf, af


def _parse_drivebench(record: dict, root: Path, unknown: str) -> Sample:
    raw_q = _get_str(record, "question", how="give the question text")
    answer = _get_str(record, "answer", how="give the reference answer (a letter for multiple choice)")
    label = _get_str(record, "question_type", how="use perception, prediction, planning or behavior")
    cams = _camera_paths(record, "image_path")
    for key in ("scene_token", "frame_token"):
        if key in record and not isinstance(record[key], str):
            raise _Problem(key, f"is a {_json_type(record[key])}, expected a string token")
    _check_tag(record)

    capability = _capability(label, "question_type", unknown, "use perception, prediction, planning or behavior")
    question = _question_answer(raw_q, answer, "question", "answer")

    sid = _explicit_safe_id(record)
    if sid is None:
        if "frame_token" not in record:
            raise _Problem("frame_token", "missing; the sample id is derived from it (or give an `id` field)")
        sid = drivebench_id(record["frame_token"], question)
    return Sample(
        id=sid,
        capability=capability,
        images=tuple(_resolve(root, p) for _, p in cams),
        question=question,
        answer=answer,
        question_type=label,
        record=record,
        source="drivebench",
    )


_PARSERS = {"drivekd": _parse_drivekd, "drivebench": _parse_drivebench, "drivelm": _parse_drivelm,
            "robosense": _parse_robosense}


# --------------------------------------------------------------------------------------- images


def _written_images(record: dict, fmt: str) -> list[tuple[str, str]]:
    """(field, path as written) per image of a parsed record, in the Sample's image order."""
    if fmt == "drivekd":
        return [(f"images[{i}]", p) for i, p in enumerate(record["images"])]
    key = _CAMERA_KEY[fmt]
    return [(f"{key}.{c}", p) for c, p in _camera_paths(record, key)]


def _check_inside(sample: Sample, record: dict, fmt: str, root: Path, explicit_root: bool) -> None:
    """Refuse an image path that escapes the image root: a relative one that climbs out (`../x.jpg`),
    or, when the root was given (--images), an absolute one elsewhere. Absolute paths with no root
    given name their files on purpose and are kept."""
    for (field, given), p in zip(_written_images(record, fmt), sample.images):
        if os.path.isabs(given) and not explicit_root:
            continue
        if os.path.commonpath([str(root), str(p)]) != str(root):
            raise _Problem(field, f"{given!r} resolves to {p}, outside the image root {root}; keep the images under "
                           "the image root (--images), or pass --allow-outside-images if you mean it", sample.id)


def _check_images(sample: Sample, record: dict, fmt: str, cache: dict[Path, str | None]) -> None:
    for resolved, (field, as_written) in zip(sample.images, _written_images(record, fmt)):
        if resolved not in cache:
            cache[resolved] = _image_problem(resolved)
        problem = cache[resolved]
        if problem is not None:
            if as_written.startswith(NUSCENES_PREFIX) and not resolved.exists():
                problem += (f" (a DriveLM path: {NUSCENES_PREFIX} is read as the image root, so --images is "
                            "the folder holding samples/)")
            raise _Problem(field, f"image {as_written!r} (resolved to {resolved}) {problem}", sample.id)


def _image_problem(p: Path) -> str | None:
    if not p.is_file():
        return ("does not exist; pass --images with the folder the image paths "
                "are relative to (default: the JSON file's folder)")
    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        return f"cannot be read as an image ({type(e).__name__}: {e}); replace or remove the file"
    return None
