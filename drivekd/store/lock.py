"""One writer per store role: a lock file naming its holder (host, pid), stale locks detected.

    STORE/.locks/<role>.lock     {"host", "pid", "since", "command", "roles"} of the holder

The lock is an exclusive `flock` on that file, held for the life of the build. Why flock: the
kernel drops it when its process dies, however it dies (kill -9, OOM, power loss of a client), so
a lock left by a dead build is recognised as stale with no guessing from pids (which are reused)
and taken over; the file's content serves only to name the live holder in the refusal. Release
deletes the file while still holding the lock; a process that opened the old file meanwhile
notices (its inode is no longer the one at the path) and retries on the new one.

A torchrun build takes the lock in rank 0 only; the other ranks follow rank 0's decision
(`drivekd.teacher.build`), so ranks of one build coordinate as before.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from drivekd.errors import StoreError
from drivekd.fileio import write_error

log = logging.getLogger(__name__)
LOCK_DIR = ".locks"


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has just started and not yet written its name)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since}: {holder.get('command', '?')})"


class StoreLock:
    """Locks for some roles of a store, all or none. Use as a context manager or acquire()/release()."""

    def __init__(self, store: str | Path, roles: list[str], command: str | None = None):
        self.dir = Path(store) / LOCK_DIR
        self.roles = list(roles)
        self.held: list[tuple[Path, int]] = []
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "command": command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
            "roles": self.roles,
        }

    def path(self, role: str) -> Path:
        return self.dir / f"{role}.lock"

    def acquire(self) -> "StoreLock":
        """Take every role's lock, or none. A full or read-only disk (or a file where the store's
        folder should be) is one StoreError naming the path and the free space there."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for role in sorted(self.roles):
                self._take(role)
        except OSError as e:
            self.release()
            raise StoreError(str(write_error(e, Path(e.filename or self.dir), "the store lock (or its folder)", "Free space there or make it "
                                             "writable (or use another store folder), then run the same command again"))) from None
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, role: str) -> None:
        path = self.path(role)
        for _ in range(20):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder(path)
                raise StoreError(
                    f"the {role} role of store {self.dir.parent} is being built by {describe(holder)}; a store role has one "
                    f"writer at a time. Wait for that build to finish, or build into another --out"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder released (deleted) it after we opened it: take the new file
                os.close(fd)
                continue
            old = self._holder(path)
            if old:
                log.warning("store lock %s: took over a stale lock of %s (that process has ended)", path, describe(old))
            self.held.append((path, fd))  # released (and removed) by acquire if naming ourselves fails
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(self.me) + "\n").encode())
            except OSError as e:  # os.write names no file: name the lock
                raise OSError(e.errno, e.strerror, str(path)) from None
            return
        raise StoreError(f"could not take the lock {path}: it keeps changing; is another build starting at this moment?")

    @staticmethod
    def _holder(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not yet written by a holder that has just taken it

    def release(self) -> None:
        for path, fd in self.held:
            try:
                path.unlink()  # still holding the lock: nobody else can own this file now
            except FileNotFoundError:
                pass
            os.close(fd)
        self.held = []

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
