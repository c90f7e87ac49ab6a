"""Content checksums of stored arrays, and the chunk files a complete sample must have.

Why CRC32C over the stored values (not the compressed chunk bytes, not sha256): the reader
already holds each layer's packed fp16 row after zarr decodes it, so one pass of hardware CRC32C
(google_crc32c, a dependency of zarr itself; ~11 GB/s here) checks exactly what training will
use, whatever went wrong underneath: flipped bytes (blosc either refuses them or decodes other
values), a deleted chunk (zarr returns the fill value), a chunk copied from another sample or a
hand-edited zarr.json. A cryptographic hash would cost ~6x more per read and guards against no
realistic accident that CRC32C misses (any burst of <= 32 bits, else a 2^-32 chance).

The checksums are written with the data: the completion mark of a sample (and of a shared
prefix) holds them, in the same single zarr.json write that marks it complete (schema 3).
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np

from drivekd.errors import StoreError

ALGORITHM = "crc32c"
# 1-D arrays of a sample group; their only chunk is <name>/c/0. attn's layer k is attn/c/<k>/0.
SAMPLE_VECTORS = ("input_ids", "vision", "text")
PREFIX_VECTORS = ("input_ids",)


def checksum(a: np.ndarray) -> str:
    """CRC32C of an array's bytes in C order, as 8 hex digits."""
    a = np.ascontiguousarray(a)
    return f"{google_crc32c.value(a.view(np.uint8).reshape(-1)):08x}"


def chunk_file(group_dir: Path, name: str, layer_row: int | None = None) -> Path:
    """The file holding an array's chunk (zarr v3 default chunk keys, '/' separated)."""
    return group_dir / name / "c" / "0" if layer_row is None else group_dir / name / "c" / str(layer_row) / "0"


def expected_files(group_dir: Path, vectors: tuple[str, ...], n_layers: int) -> list[Path]:
    """Every metadata and chunk file a complete sample/prefix group has (written with empty chunks kept)."""
    files = []
    for name in vectors:
        files += [group_dir / name / "zarr.json", chunk_file(group_dir, name)]
    files.append(group_dir / "attn" / "zarr.json")
    files += [chunk_file(group_dir, "attn", k) for k in range(n_layers)]
    return files


def nonfinite(a, allow_neg_inf: bool = False) -> str:
    """'' when every value of `a` (a numpy array or CPU tensor) is finite, else how many are not:
    "1275 of 1275 values NaN". allow_neg_inf: -inf is a value (a log-probability of 0), NaN and
    +inf are not."""
    v = np.asarray(a)
    if v.dtype.kind != "f" or v.size == 0:
        return ""
    if v.dtype == np.float16 and not allow_neg_inf:
        # Fast path for every stored attention row: fp16 is inf or NaN exactly when its 5 exponent
        # bits are all ones. An integer max is ~4x cheaper than np.isfinite on fp16 (which numpy
        # emulates) and cheaper than the row's CRC32C.
        if int((v.view(np.uint16) & 0x7C00).max()) != 0x7C00:
            return ""
    elif np.isfinite(v).all():
        return ""
    bad = np.isnan(v) | (np.isposinf(v) if allow_neg_inf else np.isinf(v))
    if not bad.any():
        return ""
    n_nan, n_bad = int(np.isnan(v).sum()), int(bad.sum())
    kinds = "NaN" if n_nan == n_bad else ("inf" if n_nan == 0 else "NaN or inf")
    return f"{n_bad} of {v.size} values {kinds}"


class NonFiniteTargets(StoreError):
    """Teacher targets with NaN or inf values, found as they are written: the sample (or shared
    prefix, sample_id None) is never marked complete. `what` says which array and how many values."""

    def __init__(self, role: str, sample_id: str | None, what: str):
        self.role, self.sample_id, self.what = role, sample_id, what
        who = f"sample {sample_id!r}" if sample_id is not None else "a shared prefix"
        super().__init__(f"non-finite {role} teacher targets for {who} ({what})")
