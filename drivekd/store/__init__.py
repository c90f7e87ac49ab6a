"""The teacher store and the interface targets come through.

    targets      TargetSource (the whole contract), SampleTargets, RoleInfo
    memory       InMemoryTargets: a TargetSource held in memory
    format       layout, schema versions, Encoding, map packing, checkpoint_fingerprint
    backend      Backend (what the store needs from where its files live), LocalBackend
    reader / writer / maintenance    the Zarr store's reading, writing, verify/repair/summary
    zarr_store   TeacherStore: all three in one object
    signals, integrity, lock         logits/hidden arrays, checksums, the build lock

The common names are importable from `drivekd.store` itself; they load on first use, so importing
drivekd.store.targets (the trainer does) does not import zarr.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "TargetSource": "targets", "SampleTargets": "targets", "RoleInfo": "targets", "LogitTargets": "targets", "HiddenTargets": "targets",
    "InMemoryTargets": "memory",
    "Encoding": "format", "SCHEMA_VERSION": "format", "READABLE_VERSIONS": "format", "MUST_MATCH": "format", "check_key": "format",
    "pack_tril": "format", "unpack_tril": "format", "pack_rows": "format", "encode_map": "format", "decode_map": "format",
    "checkpoint_fingerprint": "format",
    "Backend": "backend", "LocalBackend": "backend",
    "StoreReader": "reader", "StoreWriter": "writer", "StoreMaintenance": "maintenance", "Problem": "maintenance",
    "TeacherStore": "zarr_store",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'drivekd.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drivekd.store.{_HOMES[name]}"), name)
