"""Files a long job writes as it goes (run.json, metrics.jsonl, reports, per-sample parts).

Two rules, in one place:
* a file that is rewritten is never seen half-written: write a temporary file in the same folder,
  fsync it, then `os.replace` it onto the name (atomic on POSIX), so a killed process leaves the old
  file or the new one;
* a write that fails for lack of space (or any OS reason) becomes one `DriveKDError` naming the file,
  the free space and what to do, instead of a raw OSError traceback in the middle of a run.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from drivekd.errors import DriveKDError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error(e: OSError, path: Path, what: str, fix: str) -> DriveKDError:
    """One clear error for a failed write of `path` (`what` it holds; `fix`: how to go on)."""
    where = path.parent
    while not where.is_dir() and where != where.parent:  # a folder not yet made (or a file in the way): ask its nearest existing one
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    why = "disk full" if getattr(e, "errno", None) in _FULL else (e.strerror or str(e))
    return DriveKDError(f"could not write {what} {path} ({why}; {free}). {fix}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path in `path`'s folder, fsync it, then replace `path` with it.

    The temporary file is removed when anything fails; OSError propagates (callers know what the file
    is and turn it into a `write_error`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def append_line(path: str | Path, line: str, what: str, fix: str) -> None:
    """Append one line (a JSON record) and flush it; a failed write raises `write_error`.

    A write cut short by a full disk may leave a partial last line; readers of such logs skip an
    unparseable last line (see `drivekd.trainer.loop._truncate_metrics`)."""
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
    except OSError as e:
        raise write_error(e, path, what, fix) from e


__all__ = ["append_line", "atomic_write", "atomic_write_text", "write_error"]
