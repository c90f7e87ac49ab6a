"""Where a teacher store's files live, behind the few operations the store needs.

The store's modules (reader, writer, maintenance) never touch the file system directly: they ask
a `Backend`. `LocalBackend` is a local directory, the only one shipped. An object store (S3, GCS)
implements the same nine methods; zarr itself reaches it through `zarr_location` (an fsspec URL
such as "s3://bucket/store/planning/samples/x" opens there when fsspec's driver is installed).

Locations are what `root / key / ...` gives: `pathlib.Path` here; an object-store backend would
use a path-like of its own (universal_pathlib's UPath, say). They name objects in messages too.

What the store's crash safety asks of a backend: a single object (a group's `zarr.json`, which
holds a sample's completion mark) is written whole or not at all, as zarr's local store does by
writing a temporary file and renaming it, and as object stores do for every PUT. Nothing else is
atomic: a sample is complete only once its mark says so, and it is written last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    root: Path  # the store's location; every other location is root / key / ...

    def zarr_location(self, loc: Path) -> str:
        """What `zarr.open_group`/`zarr.open_array` open for this location (a path or a URL)."""
        ...

    def is_file(self, loc: Path) -> bool:
        """An object exists at exactly this location."""
        ...

    def exists(self, loc: Path) -> bool:
        """Anything is at or under this location (a group that was started, even if left empty)."""
        ...

    def read_json(self, loc: Path) -> dict:
        """A JSON object stored at `loc`; raises OSError (absent) or ValueError (not JSON)."""
        ...

    def children(self, loc: Path) -> list[Path]:
        """The locations directly under `loc` ([] when there is none)."""
        ...

    def delete(self, loc: Path) -> None:
        """Remove `loc` and everything under it (nothing when absent)."""
        ...

    def size(self, loc: Path) -> int:
        """Bytes of every object at or under `loc` (0 when absent)."""
        ...

    def prepare(self) -> None:
        """Make the root writable before a build writes into it (a local directory: create it)."""
        ...

    def free_bytes(self) -> int | None:
        """Free space where the store is written, for naming a full disk; None when unknown."""
        ...


class LocalBackend:
    """A store in a local directory (or any mounted file system)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def zarr_location(self, loc: Path) -> str:
        return str(loc)

    def is_file(self, loc: Path) -> bool:
        return loc.is_file()

    def exists(self, loc: Path) -> bool:
        return loc.exists()

    def read_json(self, loc: Path) -> dict:
        return json.loads(loc.read_text())

    def children(self, loc: Path) -> list[Path]:
        return list(loc.iterdir()) if loc.is_dir() else []

    def delete(self, loc: Path) -> None:
        if loc.is_dir():
            shutil.rmtree(loc)
        elif loc.exists():
            loc.unlink()

    def size(self, loc: Path) -> int:
        return sum(f.stat().st_size for f in loc.rglob("*") if f.is_file()) if loc.exists() else 0

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free
