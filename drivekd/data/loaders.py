"""Read Drive-KD and DriveBench JSON files into `Sample`s (METHOD.md section 1).

Both formats are JSON lists of records; the format is detected per file:

* Drive-KD (the authors' `data/demo.json`): `messages` (user turn with one `<image>` tag per image,
  assistant turn = answer) or flat `question`/`answer`; `images`; the capability label under
  `question_type`, `type` or `capability`, with aliases (see `CAPABILITY_ALIASES`).
* DriveBench: `scene_token`, `frame_token`, `question_type` (perception|prediction|planning|behavior),
  `question`, `answer`, `tag`, `image_path` {camera: path}. Images are ordered by `CAMERA_ORDER`.

Sample ids come from `drivekd.ids` (explicit `id` field, else a content hash; never list position).

Every problem raises `DataError` naming the file, the record index and id (when known), the field,
and what to do. All records are checked before raising, so one run lists every problem (the first
`MAX_LISTED_PROBLEMS` are shown).
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
from drivekd.ids import drivebench_id, drivekd_id, explicit_id

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

Format = Literal["auto", "drivekd", "drivebench"]


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

    index: int
    label: str  # the label as written


@dataclass(frozen=True)
class LoadReport:
    """What `load_samples_report` read from one file."""

    path: Path
    format: str  # "drivekd" or "drivebench"
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
    """Read one Drive-KD or DriveBench JSON file; see `load_samples_report` for the arguments."""
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
    format: "auto" detects the format from the records.
    allow_outside_images: accept image paths that escape the image root (a relative `../x.jpg`, or an
        absolute path outside an explicitly given `images_root`); refused by default, since such a
        path usually means a wrong root.
    """
    if unknown_capability not in ("error", "skip"):
        raise DataError(f"unknown_capability must be 'error' or 'skip', got {unknown_capability!r}")
    path = Path(path)
    records = _read_json_list(path)
    fmt = _detect_format(path, records) if format == "auto" else format
    if fmt not in ("drivekd", "drivebench"):
        raise DataError(f"format must be 'auto', 'drivekd' or 'drivebench', got {format!r}")
    root = Path(os.path.abspath(images_root if images_root is not None else path.parent))
    parse = _parse_drivekd if fmt == "drivekd" else _parse_drivebench
    image_cache: dict[Path, str | None] = {}

    samples: list[Sample] = []
    indices: list[int] = []
    skipped: list[SkippedRecord] = []
    problems: list[str] = []
    for index, record in enumerate(records):
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
            problems.append(_format_problem(index, p.sample_id or _explicit_id(record), p.field, p.message))
            continue
        samples.append(sample)
        indices.append(index)

    first_index: dict[str, int] = {}
    folded: dict[str, int] = {}  # lower-cased id -> record: ids that differ only in case
    for sample, index in zip(samples, indices):
        low = sample.id.lower()
        if sample.id not in first_index and low in folded:
            j = folded[low]
            problems.append(_format_problem(
                index, sample.id, "id",
                f"differs only in case from the id {samples[indices.index(j)].id!r} of record {j}; the two would "
                f"share one store folder on a case-insensitive disk (macOS, Windows): give them distinct `id` fields",
            ))
            continue
        folded.setdefault(low, index)
        if sample.id in first_index:
            j = first_index[sample.id]
            problems.append(_format_problem(
                index, sample.id, "id",
                f"same id as record {j}; the two records have the same content or the same explicit "
                f"`id` - remove the duplicate or give them distinct `id` fields",
            ))
        else:
            first_index[sample.id] = index

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


def _read_json_list(path: Path) -> list[Any]:
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
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top level is a JSON {_json_type(data)}, expected a list of records "
            "([{...}, {...}]); wrap the records in a list"
        )
    if not data:
        raise DataError(f"{path}: the list of records is empty; nothing to load")
    return data


def _detect_format(path: Path, records: list[Any]) -> str:
    bench = [i for i, r in enumerate(records) if isinstance(r, dict) and "image_path" in r]
    kd = [i for i, r in enumerate(records) if isinstance(r, dict) and ("messages" in r or "images" in r)]
    if bench and kd:
        raise DataError(
            f"{path}: mixes DriveBench records (`image_path`, e.g. record {bench[0]}) and Drive-KD records "
            f"(`messages`/`images`, e.g. record {kd[0]}); put each format in its own file"
        )
    return "drivebench" if bench else "drivekd"


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _format_problem(index: int, sample_id: str | None, field: str, message: str) -> str:
    who = f"record {index}" + (f" (id {sample_id!r})" if sample_id else "")
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

    question = strip_image_tags(raw_q)
    if not question:
        raise _Problem(q_field, "has no text besides the `<image>` tags; write the question after them")
    if not answer.strip():
        raise _Problem(a_field, "is empty; give the reference answer (or drop the record)")

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
    if "image_path" not in record:
        raise _Problem("image_path", "missing; give {\"CAM_FRONT\": path, ...}")
    paths = record["image_path"]
    if not isinstance(paths, dict) or not paths:
        what = f"a {_json_type(paths)}" if not isinstance(paths, dict) else "an empty object"
        raise _Problem("image_path", f"is {what}, expected an object {{camera: path}}")
    for cam, p in paths.items():
        if not isinstance(p, str) or not p.strip():
            raise _Problem(f"image_path.{cam}", f"is {p!r}, expected a non-empty path string")
    for key in ("scene_token", "frame_token"):
        if key in record and not isinstance(record[key], str):
            raise _Problem(key, f"is a {_json_type(record[key])}, expected a string token")
    if "tag" in record:
        tag = record["tag"]
        tags = tag if isinstance(tag, list) else [tag]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            raise _Problem("tag", f"is {tag!r}, expected an integer or a list of integers (0..3)")

    capability = _capability(label, "question_type", unknown, "use perception, prediction, planning or behavior")
    question = strip_image_tags(raw_q)
    if not question:
        raise _Problem("question", "is empty; give the question text")
    if not answer.strip():
        raise _Problem("answer", "is empty; give the reference answer (or drop the record)")

    sid = _explicit_safe_id(record)
    if sid is None:
        if "frame_token" not in record:
            raise _Problem("frame_token", "missing; the sample id is derived from it (or give an `id` field)")
        sid = drivebench_id(record["frame_token"], question)
    cams = [c for c in CAMERA_ORDER if c in paths] + sorted(c for c in paths if c not in CAMERA_ORDER)
    return Sample(
        id=sid,
        capability=capability,
        images=tuple(_resolve(root, paths[c]) for c in cams),
        question=question,
        answer=answer,
        question_type=label,
        record=record,
        source="drivebench",
    )


# --------------------------------------------------------------------------------------- images


def _check_inside(sample: Sample, record: dict, fmt: str, root: Path, explicit_root: bool) -> None:
    """Refuse an image path that escapes the image root: a relative one that climbs out (`../x.jpg`),
    or, when the root was given (--images), an absolute one elsewhere. Absolute paths with no root
    given name their files on purpose and are kept."""
    if fmt == "drivekd":
        raw = [(f"images[{i}]", p) for i, p in enumerate(record.get("images") or [])]
    else:
        paths = record["image_path"]
        cams = [c for c in CAMERA_ORDER if c in paths] + sorted(c for c in paths if c not in CAMERA_ORDER)
        raw = [(f"image_path.{c}", paths[c]) for c in cams]
    for (field, given), p in zip(raw, sample.images):
        if os.path.isabs(given) and not explicit_root:
            continue
        if os.path.commonpath([str(root), str(p)]) != str(root):
            raise _Problem(field, f"{given!r} resolves to {p}, outside the image root {root}; keep the images under "
                           "the image root (--images), or pass --allow-outside-images if you mean it", sample.id)


def _check_images(sample: Sample, record: dict, fmt: str, cache: dict[Path, str | None]) -> None:
    if fmt == "drivekd":
        fields = [f"images[{i}]" for i in range(len(sample.images))]
        written = list(record["images"])
    else:
        paths = record["image_path"]
        cams = [c for c in CAMERA_ORDER if c in paths] + sorted(c for c in paths if c not in CAMERA_ORDER)
        fields = [f"image_path.{c}" for c in cams]
        written = [paths[c] for c in cams]
    for resolved, field, as_written in zip(sample.images, fields, written):
        if resolved not in cache:
            cache[resolved] = _image_problem(resolved)
        problem = cache[resolved]
        if problem is not None:
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
