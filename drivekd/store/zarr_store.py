"""`TeacherStore`: the Zarr teacher store, read, written and looked after through one object.

The pieces live in their own modules: the format (drivekd.store.format: layout, versions,
encoding), reading (drivekd.store.reader), writing (drivekd.store.writer), verify/repair/summary
(drivekd.store.maintenance) and the files behind a backend (drivekd.store.backend). The format's
names are importable from here as before, and from `drivekd.store`.
"""

from __future__ import annotations

from drivekd.store.format import (  # noqa: F401 - the store's public names, importable from here as before
    MUST_MATCH,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    Encoding,
    check_key,
    decode_map,
    encode_map,
    pack_rows,
    pack_tril,
    checkpoint_fingerprint,
    unpack_tril,
)
from drivekd.store.maintenance import Problem, StoreMaintenance
from drivekd.store.writer import StoreWriter


class TeacherStore(StoreWriter, StoreMaintenance):
    """Reader, writer (mode "a") and maintainer of a teacher store. Implements `TargetSource`.

    `TeacherStore(path)` reads a local store; `TeacherStore(path, mode="a")` creates or extends one;
    `backend=` puts it elsewhere (drivekd.store.backend)."""


__all__ = ["MUST_MATCH", "READABLE_VERSIONS", "SCHEMA_VERSION", "Encoding", "Problem", "TeacherStore", "check_key", "decode_map",
           "encode_map", "pack_rows", "pack_tril", "checkpoint_fingerprint", "unpack_tril"]
