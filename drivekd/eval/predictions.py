"""predictions.json in DriveBench format (each input record plus "pred"), written atomically, resumable.

During generation every finished prediction is appended (and flushed) to a progress file beside
predictions.json, `predictions.partial.jsonl`, one `{"id": ..., "pred": ...}` per line. A killed
run restarts with `load_existing`, which reads both files; a truncated last line (killed mid-write)
is ignored. At the end `finalize_predictions` writes predictions.json in the input order and removes
the progress file.

Typical use by a generator::

    done = load_existing(pred_path)
    with PartialWriter(partial_path(pred_path)) as progress:
        for sample in samples:
            if sample.id not in done:
                done[sample.id] = generate(sample)
                progress.write(sample.id, done[sample.id])
    records = finalize_predictions(pred_path, [s.record for s in samples], done, ids=[s.id for s in samples])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from drivekd.errors import DataError
from drivekd.fileio import atomic_write_text
from drivekd.eval.score import record_id

PREDICTIONS_FILE = "predictions.json"




def read_predictions(path: str | Path, require_pred: bool = True) -> list[dict[str, Any]]:
    """Read a DriveBench-format JSON list of records; each must have "pred" unless `require_pred` is False."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"predictions file {path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"predictions file {path} must hold a JSON list of records, found {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected a JSON object")
        if require_pred and "pred" not in rec:
            raise DataError(f"{path}: record {i} (id {record_id(rec)}) has no 'pred' field")
    return data


def write_predictions(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Atomically write records (DriveBench format, every field kept) as a JSON list."""
    return atomic_write_text(path, json.dumps(list(records), ensure_ascii=False, indent=2) + "\n")


def partial_path(predictions_path: str | Path) -> Path:
    """The progress file of a predictions file: predictions.json -> predictions.partial.jsonl."""
    p = Path(predictions_path)
    return p.with_name(p.stem + ".partial.jsonl")


def load_partial(path: str | Path) -> dict[str, Any]:
    """{id: pred} from a progress file; lines that do not parse (a truncated last line) are skipped."""
    path = Path(path)
    if not path.exists():
        return {}
    done: dict[str, Any] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # cut off mid-write by a kill
                continue
            if isinstance(entry, dict) and "id" in entry and "pred" in entry:
                done[str(entry["id"])] = entry["pred"]
    return done


def load_existing(predictions_path: str | Path, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """{id: pred} already produced: from predictions.json (if complete) and its progress file.

    Ids of predictions.json records come from `ids` when given (same order as the file), else from
    `record_id`. The progress file wins where both have an id (it is newer).
    """
    path = Path(predictions_path)
    done: dict[str, Any] = {}
    if path.exists():
        records = read_predictions(path)
        if ids is not None and len(ids) != len(records):
            raise DataError(f"{path} holds {len(records)} records but {len(ids)} ids were given")
        for i, rec in enumerate(records):
            done[ids[i] if ids is not None else record_id(rec)] = rec["pred"]
    done.update(load_partial(partial_path(path)))
    return done


class PartialWriter:
    """Append `{"id", "pred"}` lines to a progress file, flushed and fsynced after every line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")
        # A kill mid-write leaves a line without its newline: close it so the next line stays whole.
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def write(self, id: str, pred: Any) -> None:
        self._f.write((json.dumps({"id": id, "pred": pred}, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "PartialWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finalize_predictions(
    predictions_path: str | Path,
    records: Sequence[Mapping[str, Any]],
    preds: Mapping[str, Any],
    ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Write predictions.json (each record plus "pred", input order) and remove the progress file.

    `ids[i]` is the key of `records[i]` in `preds` (default: `record_id`). Raises DataError when a
    record has no prediction yet.
    """
    ids = list(ids) if ids is not None else [record_id(r) for r in records]
    if len(ids) != len(records):
        raise DataError(f"{len(records)} records but {len(ids)} ids")
    missing = [rid for rid in ids if rid not in preds]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(records)} records have no prediction yet (first: {missing[0]}); "
            "re-run the evaluation to finish them"
        )
    out = [{**rec, "pred": preds[rid]} for rid, rec in zip(ids, records)]
    write_predictions(predictions_path, out)
    partial_path(predictions_path).unlink(missing_ok=True)
    return out
