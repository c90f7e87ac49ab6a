"""Sample ids: how they are derived and what a storage-safe key is. The one place for both.

Ids are never derived from list position, so shuffling or splitting a file keeps every id, and
the same record gets the same id in the teacher store, the training run and `predictions.json`:

* an explicit `id` field wins; if it is not a safe key it is mapped by `safe_key`;
* Drive-KD records: `dk-` + 16 hex chars of sha256 over (image paths as written, question,
  answer, capability), so the messages form and the flat form of one sample share an id;
* DriveBench records: `<frame_token>-` + 10 hex chars of sha256 over the question (image tags
  removed);
* DriveLM and RoboSense records: `<frame_token>-` + 10 hex chars of sha256 over (scene token,
  frame token, question), so one question about one frame has one id in both formats.

A safe key matches `[A-Za-z0-9._-]+`, does not start with '.', contains no '..', and has at most
`MAX_KEY_LEN` characters: it can name a folder in the Zarr store on any file system.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

MAX_KEY_LEN = 128
_SAFE_RE = re.compile(r"[A-Za-z0-9._-]+")


def is_safe_key(s: Any) -> bool:
    """True if `s` can be used as a storage key as is."""
    return (
        isinstance(s, str)
        and 0 < len(s) <= MAX_KEY_LEN
        and _SAFE_RE.fullmatch(s) is not None
        and not s.startswith(".")
        and ".." not in s
    )


def safe_key(raw: str) -> str:
    """`raw` if it is a safe key, else a deterministic safe key that no other `raw` maps to: runs of
    other characters (and '..') become '_', leading dots go, and '-' + 16 hex chars of sha256 of the
    original are appended."""
    if is_safe_key(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", raw)
    cleaned = re.sub(r"\.{2,}", "_", cleaned).lstrip(".")
    cleaned = cleaned[: MAX_KEY_LEN - 17] or "id"
    return f"{cleaned}-{hashlib.sha256(raw.encode('utf-8')).hexdigest()[:16]}"


def content_hash(obj: Any) -> str:
    """sha256 hex of a JSON-serialisable value (canonical: sorted keys, no spaces)."""
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def explicit_id(raw: str | int) -> str:
    """The key of an explicit `id` field."""
    return safe_key(str(raw))


def drivekd_id(images: list[str], question: str, answer: str, capability: str) -> str:
    """Id of a Drive-KD record without an `id` field (`question` with image tags removed)."""
    return "dk-" + content_hash([list(images), question, answer, capability])[:16]


def drivebench_id(frame_token: str, question: str) -> str:
    """Id of a DriveBench record without an `id` field (`question` with image tags removed)."""
    token = safe_key(frame_token)[: MAX_KEY_LEN - 11]
    return f"{token}-{content_hash(question)[:10]}"


def scene_frame_id(scene_token: str, frame_token: str, question: str) -> str:
    """Id of a DriveLM or RoboSense question (no `id` field): from scene, frame and question text."""
    token = safe_key(frame_token)[: MAX_KEY_LEN - 11]
    return f"{token}-{content_hash([scene_token, frame_token, question])[:10]}"
