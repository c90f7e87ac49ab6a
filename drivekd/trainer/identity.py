"""What a run trains on, by content: resume refuses to continue on something else, and the store's
tokens are checked against the data's before step 1.

Identity of a run (recorded in every checkpoint's trainer_state.json and in run.json):

* data: sha256 of the --data file's bytes (content, not path: a moved file is the same data);
* cache, per role: the store's build settings (teacher, processor, layers, encoding, text tokens)
  and a digest of the targets the run reads (every trained sample's checksums, see
  `TeacherStore.content_digest`): another store, or the same one rebuilt with other results, differs;
* student: the starting checkpoint's fingerprint (config, safetensors headers, sampled weights).

`--resume` refuses any difference, naming it; `--resume-allow-changed data,cache,student` lets
through the named kinds, and run.json keeps every start of the run in its `history`, so that the
record says which steps used which data, targets or student.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from drivekd.errors import AlignmentError, ConfigError
from drivekd.fileio import atomic_write_text, write_error
from drivekd.store.targets import TargetSource

KINDS = ("data", "cache", "student")
FLAG = "--resume-allow-changed"


def parse_allowed(spec: str | None) -> list[str]:
    """'data,cache' -> ['data', 'cache']; a ConfigError naming the flag on anything else."""
    kinds = [k.strip() for k in (spec or "").split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"{FLAG}: unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)} (comma separated)")
    return kinds


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def role_identity(source: TargetSource, role: str, sample_ids: list[str]) -> dict[str, Any]:
    info = source.role_info(role)
    ident: dict[str, Any] = {"checkpoint_fingerprint": info.teacher, "processor_fingerprint": info.processor, "family": info.family,
                             "layers": list(info.layers)}
    m = source.role_meta(role)
    ident.update(encoding=m.get("encoding"), text_tokens=m.get("text_tokens"))
    ident["targets"] = source.content_digest(role, sample_ids)
    return ident


def run_identity(cfg, source: TargetSource, roles: list[str], sample_ids: list[str]) -> dict[str, Any]:
    from drivekd.store.zarr_store import checkpoint_fingerprint

    return {
        "data": {"sha256": file_sha256(cfg.data), "path": str(cfg.data)},
        "cache": {r: role_identity(source, r, sample_ids) for r in roles},
        "student": {"fingerprint": checkpoint_fingerprint(cfg.student), "path": str(cfg.student)},
    }


def _differences(old: dict, new: dict) -> dict[str, str]:
    """kind -> what differs (paths are not identity)."""
    out = {}
    if old["data"]["sha256"] != new["data"]["sha256"]:
        out["data"] = f"--data content differs (checkpoint: {old['data']['path']} sha256 {old['data']['sha256'][:12]}, now {new['data']['path']} " \
                      f"sha256 {new['data']['sha256'][:12]})"
    roles = sorted(set(old["cache"]) | set(new["cache"]))
    what = []
    for r in roles:
        a, b = old["cache"].get(r), new["cache"].get(r)
        if a is None or b is None:
            what.append(f"role {r} {'added' if a is None else 'removed'}")
            continue
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if keys:
            what.append(f"{r}: {', '.join('stored target values' if k == 'targets' else k for k in keys)}")
    if what:
        out["cache"] = "--cache holds other targets (" + "; ".join(what) + ")"
    if old["student"]["fingerprint"] != new["student"]["fingerprint"]:
        out["student"] = f"--student is another checkpoint (was {old['student']['path']}, now {new['student']['path']})"
    return out


def check_resume(resume_dir: Path | None, identity: dict[str, Any], allow_spec: str | None) -> list[str]:
    """Refuse to resume from a checkpoint trained on other data, targets or student, unless allowed.
    Returns the allowed kinds that did change (recorded in run.json's history)."""
    allowed = parse_allowed(allow_spec)
    if resume_dir is None:
        return []
    from drivekd.trainer.checkpoint import read_meta

    old = read_meta(resume_dir).get("identity")
    if old is None:
        raise ConfigError(f"cannot resume from {resume_dir}: the checkpoint records no data/store/student identity (written by an "
                          f"older drivekd), so it cannot be checked; pass {FLAG} {','.join(KINDS)} to resume anyway")
    diffs = _differences(old, identity)
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        kinds = ",".join(refused)
        raise ConfigError(f"cannot resume from {resume_dir}: " + "; ".join(refused.values()) + ". The earlier steps were trained "
                          f"on what the checkpoint records; resume with the same inputs, or pass {FLAG} {kinds} if you really mean "
                          "to continue on these (run.json's history will say so)")
    return sorted(diffs)


def check_alignment_all(family, samples, source: TargetSource, roles: list[str], progress: bool = True) -> None:
    """Every sample's student token fingerprint against the store's, before step 1: one pass of
    the data's tokenisation. Names every mismatching sample (the first ones in detail)."""
    if not roles:
        return
    from tqdm import tqdm

    from drivekd.errors import DriveKDError
    from drivekd.trainer.data import check_alignment

    bad: list[str] = []
    details: list[str] = []
    for s in tqdm(samples, desc="checking tokens against the store", unit="sample", disable=not progress, dynamic_ncols=True):
        try:
            _, layout = family.encode(s)
        except DriveKDError:
            continue  # bad input (an unreadable image) is reported where the sample is loaded
        for role in roles:
            fp = source.fingerprint(role, s.id)
            if fp == layout.fingerprint:
                continue
            bad.append(s.id)
            if len(details) < 5:
                try:
                    check_alignment(layout, source.get(role, s.id, []), role, source)
                except AlignmentError as e:
                    details.append(str(e))
            break
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise AlignmentError(f"{len(bad)} sample(s) do not match the teacher store's tokens: {', '.join(bad[:10])}{more}. "
                             + " ".join(details))


def write_run_json(path: Path, record: dict[str, Any], resumed_from: Path | None, step: int) -> None:
    """run.json: the current start's record at the top level, every start (earlier ones kept) in `history`."""
    history = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            history = old.get("history") or [{k: v for k, v in old.items() if k != "history"}]
        except ValueError:
            history = []
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": str(resumed_from) if resumed_from else None,
             "from_step": step, **record}
    text = json.dumps({**record, "history": history + [entry]}, indent=2) + "\n"
    try:  # atomic: a run killed while writing keeps the previous run.json (and its history)
        atomic_write_text(path, text)
    except OSError as e:
        raise write_error(e, path, "the run record", "Nothing was trained yet in this start; free space and run the "
                          "command again (add --resume to continue from the latest checkpoint)") from e
