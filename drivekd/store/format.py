"""The teacher store's format: its layout, schema versions and how maps are encoded.

The store is a Zarr v3 hierarchy of compressed head-mean attention maps (and, per drivekd.store.signals,
logits and hidden states). This module is what every reader and writer must agree on; reading is
drivekd.store.reader, writing drivekd.store.writer, checking and repairing drivekd.store.maintenance,
and the files themselves sit behind drivekd.store.backend.

Layout (see docs/STORE.md; readable with any Zarr v3 client, no drivekd needed):

    STORE/zarr.json                          root group, attrs {"drivekd": {"schema_version": 3, "kind": "teacher-store"}}
    STORE/<role>/zarr.json                   role group, attrs: the build metadata (teacher, layers, ...)
    STORE/<role>/samples/<id>/zarr.json      sample group, attrs {"status": "complete", "length": T, ...}
    STORE/<role>/samples/<id>/input_ids      int32 (T,)   teacher token ids
    STORE/<role>/samples/<id>/vision         bool  (T,)   vision positions
    STORE/<role>/samples/<id>/text           bool  (T,)   text query positions
    STORE/<role>/samples/<id>/attn           float16 (n_layers, T*(T+1)/2), one chunk per layer:
                                             row k = layer layers[k], the lower triangle row-major
                                             (query row i contributes keys 0..i), each entry
                                             stored as A[i, j] * (i + 1)

Why the (i + 1) scale: a causal attention row sums to 1 over i+1 keys, so raw entries near 1/T
(~5e-4 at T = 2000) sit at the bottom of fp16's range, many in its subnormals, where fp16 keeps
few significant bits. Scaled, a row averages 1 and fp16 keeps its full 11 bits; max <= T.

A sample counts only when its group's `status` is "complete"; that attribute is written after
every array of the sample (zarr's local store writes each file atomically), so a killed build
leaves at worst an incomplete sample, which the next build redoes. The same single write records
a CRC32C of every stored array (per layer for attn; drivekd.store.integrity): the reader checks
each one it reads, so damaged or missing chunks stop training instead of feeding it zeros.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import BloscCodec

from drivekd.errors import StoreError
from drivekd.ids import is_safe_key

SCHEMA_VERSION = 3
# v1: no prefix sharing (reads as v2 without prefixes); v2: no checksums (read unchecked, except
# that a missing attention chunk is still an error); v3: checksummed.
READABLE_VERSIONS = (1, 2, 3)
# Keep chunks equal to the fill value on disk (a text-only sample's all-False vision mask): then
# every complete sample has every chunk file, and an absent one is damage, never "all fill".
DENSE = {"write_empty_chunks": True}

# Build metadata that must match for a build to add samples to an existing role.
MUST_MATCH = ("checkpoint_fingerprint", "processor_fingerprint", "layers", "encoding", "family", "text_tokens")


@dataclass(frozen=True)
class Encoding:
    """How maps are stored. Lossless from fp16 by default; `lossy` rounds mantissas first.

    lossy keeps `keepbits` of fp16's 10 mantissa bits (round to nearest even) before the
    lossless compressor: values stay plain fp16 for any reader, and the zeroed low bits compress
    well. Relative error per entry <= 2^-(keepbits+1).
    """

    mode: str = "lossless"  # "lossless" or "lossy"
    keepbits: int = 7
    # zstd level 1 with byte-shuffle: on row-scaled fp16 maps it compresses better than level 5
    # with bit-shuffle (6.3x vs 5.0x) and ~5x faster (15 vs 84 ms per 2M-entry layer), so the
    # writer thread keeps up with the teacher (tools/bench_cache.py).
    clevel: int = 1

    def __post_init__(self):
        if self.mode not in ("lossless", "lossy"):
            raise StoreError(f"encoding must be 'lossless' or 'lossy', not {self.mode!r} (--encoding)")
        if not 0 <= self.keepbits <= 10:
            raise StoreError(f"--keepbits must be in 0..10 (fp16 has 10 mantissa bits), not {self.keepbits}")

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "compressor": "blosc-zstd-shuffle", "clevel": self.clevel}
        if self.mode == "lossy":
            d["keepbits"] = self.keepbits
        return d

    def compressor(self) -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=self.clevel, shuffle="shuffle", typesize=2)

    def quantise(self, x: np.ndarray) -> np.ndarray:
        """fp16 array -> fp16 array as stored (identity when lossless)."""
        if self.mode == "lossless" or self.keepbits >= 10:
            return x
        drop = 10 - self.keepbits
        u = x.view(np.uint16).astype(np.uint32)
        # Round half to even on the dropped bits, then clear them.
        half = (1 << (drop - 1)) - 1 + ((u >> drop) & 1)
        u = ((u + half) >> drop) << drop
        return u.astype(np.uint16).view(np.float16)


def check_key(sample_id: str) -> str:
    """A sample id as a store key. Ids with separators or '..' could escape the store: refused."""
    if not is_safe_key(sample_id):
        raise StoreError(
            f"sample id {sample_id!r} is not a safe store key (allowed: letters, digits, '.', '_', '-'; no '..', "
            "no path separators); load data with drivekd.data.load_samples, which sanitises ids"
        )
    return sample_id


def _row_starts(T: int) -> np.ndarray:
    i = np.arange(T + 1, dtype=np.int64)
    return i * (i + 1) // 2


def pack_tril(m: torch.Tensor) -> torch.Tensor:
    """(T, T) -> (T*(T+1)/2,) lower triangle, row-major."""
    a = m.detach().cpu().numpy()
    # Row slices (memcpy) beat one big fancy-index gather ~10x at T ~ 2000.
    return torch.from_numpy(np.concatenate([a[i, : i + 1] for i in range(a.shape[0])]))


def unpack_tril(v: torch.Tensor | np.ndarray, T: int, dtype=np.float32) -> torch.Tensor:
    """(T*(T+1)/2,) -> (T, T) with zeros above the diagonal."""
    v = v.numpy() if isinstance(v, torch.Tensor) else v
    if v.size != T * (T + 1) // 2:
        raise StoreError(f"packed map has {v.size} entries, expected {T * (T + 1) // 2} for T={T}")
    out = np.zeros((T, T), dtype=dtype)
    st = _row_starts(T)
    for i in range(T):
        out[i, : i + 1] = v[st[i] : st[i + 1]]
    return torch.from_numpy(out)


def pack_rows(m: torch.Tensor, row0: int = 0) -> np.ndarray:
    """Rows row0..row0+n-1 of a causal map -> packed fp16 (row-scaled), before quantisation.

    m: (n, K) with K >= row0 + n, on any device; its row r is query row0 + r, whose keys are
    0..row0+r. A full map is row0 = 0, m (T, T). Each row is scaled by its key count. On a GPU the
    scaling, fp16 cast and packing run there, so the host receives half the bytes and the writer
    threads only compress; on CPU row slices (memcpy) beat a boolean-mask gather.
    """
    n, K = m.shape
    counts = torch.arange(row0 + 1, row0 + n + 1, dtype=torch.float32, device=m.device)
    a = (m.float() * counts[:, None]).to(torch.float16)
    if a.is_cuda:
        return _pack_masked(a, row0).cpu().numpy()
    a = a.numpy()
    return np.concatenate([a[r, : row0 + r + 1] for r in range(n)]) if n else np.zeros(0, np.float16)


def _pack_masked(a: torch.Tensor, row0: int) -> torch.Tensor:
    """The device-side packing: boolean-mask selection, which is row-major."""
    n, K = a.shape
    keep = torch.arange(K, device=a.device)[None, :] <= (row0 + torch.arange(n, device=a.device))[:, None]
    return a[keep]


def encode_map(m: torch.Tensor, encoding: "Encoding", row0: int = 0) -> np.ndarray:
    """Rows of a causal map -> packed fp16 exactly as stored (see pack_rows, then quantise)."""
    return encoding.quantise(pack_rows(m, row0))


_INV_SCALE: dict[int, np.ndarray] = {}


def _inv_scale(T: int) -> np.ndarray:
    """1/(i+1) for every packed entry of query row i, (T*(T+1)/2,) fp32, cached per T."""
    if T not in _INV_SCALE:
        if len(_INV_SCALE) > 16:
            _INV_SCALE.clear()
        _INV_SCALE[T] = np.repeat(1.0 / np.arange(1, T + 1, dtype=np.float32), np.arange(1, T + 1))
    return _INV_SCALE[T]


def decode_map(v: np.ndarray, T: int) -> torch.Tensor:
    """Packed stored row -> (T, T) fp32 head-mean attention."""
    return unpack_tril(v.astype(np.float32) * _inv_scale(T), T)


def checkpoint_fingerprint(path: str | Path) -> str:
    # Fingerprints any checkpoint folder: teachers in the store, students in run identities.
    """Config plus a cheap weights fingerprint: each safetensors header, size and sampled bytes.

    Hashing every byte of a 16 GB checkpoint would add minutes to each build; the header lists
    every tensor's name, dtype, shape and offset, and sampled blocks catch retrained weights.
    """
    path = Path(path)
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            for k in range(16):
                fh.seek(min(size - 1, 8 + n + k * max(1, (size - 8 - n) // 16)))
                h.update(fh.read(65536))
        h.update(f"{f.name}:{size}".encode())
    return h.hexdigest()
