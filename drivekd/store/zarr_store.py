"""The teacher store: a Zarr v3 hierarchy of compressed head-mean attention maps.

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
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from drivekd.errors import StoreError
from drivekd.ids import is_safe_key
from drivekd.store.integrity import ALGORITHM, PREFIX_VECTORS, SAMPLE_VECTORS, absent, checksum, chunk_file, expected_files
from drivekd.store.signals import ARRAYS as SIGNAL_ARRAYS
from drivekd.store.targets import ROLES, RoleInfo, SampleTargets

SCHEMA_VERSION = 3
# v1: no prefix sharing (reads as v2 without prefixes); v2: no checksums (read unchecked, except
# that a missing attention chunk is still an error); v3: checksummed.
READABLE_VERSIONS = (1, 2, 3)
# Keep chunks equal to the fill value on disk (a text-only sample's all-False vision mask): then
# every complete sample has every chunk file, and an absent one is damage, never "all fill".
_DENSE = {"write_empty_chunks": True}

# Build metadata that must match for a build to add samples to an existing role.
MUST_MATCH = ("teacher_fingerprint", "processor_fingerprint", "layers", "encoding", "family", "text_tokens")


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


def teacher_fingerprint(path: str | Path) -> str:
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


def _payload_bytes(payload: dict) -> int:
    """Raw bytes of a signal payload's arrays (before compression)."""
    return sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray))


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


class TeacherStore:
    """Reader (and low-level writer) of a teacher store. Implements `TargetSource`."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        self.mode = mode
        self._meta_cache: dict[str, dict] = {}
        if mode == "r":
            if not (self.path / "zarr.json").is_file():
                raise StoreError(f"no teacher store at {self.path}; build one with `drivekd-cache build --out {self.path}`")
            self.root = zarr.open_group(str(self.path), mode="r")
            meta = dict(self.root.attrs).get("drivekd", {})
            version = meta.get("schema_version")
            self.schema_version = version
            if version not in READABLE_VERSIONS:
                raise StoreError(
                    f"{self.path}: store schema version {version!r}, this drivekd reads {SCHEMA_VERSION}; "
                    "rebuild it with `drivekd-cache build --overwrite`"
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.root = zarr.open_group(str(self.path), mode="a")
            meta = dict(self.root.attrs).get("drivekd")
            self.schema_version = SCHEMA_VERSION
            if meta is None:
                self.root.attrs["drivekd"] = {"schema_version": SCHEMA_VERSION, "kind": "teacher-store"}
            elif meta.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: a schema-version {meta.get('schema_version')!r} store; this drivekd writes version "
                    f"{SCHEMA_VERSION} (prefix-shared, checksummed). It can still be read; to build into it, delete it or "
                    "pass a new --out"
                )

    @property
    def checksummed(self) -> bool:
        """Whether samples carry checksums (schema 3 and later)."""
        return (self.schema_version or 0) >= 3

    # ----- roles -----
    def roles(self) -> list[str]:
        return [r for r in ROLES if (self.path / r / "zarr.json").is_file()]

    def role_meta(self, role: str) -> dict:
        # Cached: the attrs hold every sample id, and readers ask once per sample.
        if role in self._meta_cache:
            return self._meta_cache[role]
        if role not in self.roles():
            raise StoreError(
                f"role {role!r} is not in store {self.path} (have: {', '.join(self.roles()) or 'none'}); "
                f"build it with `drivekd-cache build --teacher {role}`"
            )
        meta = dict(zarr.open_group(str(self.path / role), mode="r").attrs)
        if self.mode == "r":
            self._meta_cache[role] = meta
        return meta

    def role_info(self, role: str) -> RoleInfo:
        m = self.role_meta(role)
        return RoleInfo(role, tuple(m["layers"]), int(m["num_teacher_layers"]), m["teacher_fingerprint"], m["family"], m["processor_fingerprint"],
                        dict(m.get("signals", {})))

    def add_signals(self, role: str, settings: dict[str, dict], overwrite: bool = False) -> None:
        """Record that `role` stores these signals (besides attention), with their settings. A
        signal already recorded with other settings (another --logits-top-k) is refused."""
        g = zarr.open_group(str(self.path / role), mode="a")
        have = dict(g.attrs.get("signals", {}))
        for name, st in settings.items():
            old = have.get(name)
            if old is not None and old != st:
                if not overwrite:
                    diffs = "; ".join(f"{k}: store has {old.get(k)!r}, this build {st.get(k)!r}" for k in sorted(set(old) | set(st)) if old.get(k) != st.get(k))
                    raise StoreError(f"role {role} of {self.path} stores {name} with other settings ({diffs}). Use the store's settings, "
                                     f"another --out, or --overwrite to delete the role's {name} and recompute it")
                self._drop_signal(role, name)
            have[name] = st
        g.update_attributes({"signals": have})
        self._meta_cache.pop(role, None)

    def init_role(self, role: str, meta: dict, overwrite: bool = False) -> None:
        """Create the role group, or check that an existing one was built with the same settings."""
        rdir = self.path / role
        if (rdir / "zarr.json").is_file():
            old = dict(zarr.open_group(str(rdir), mode="r").attrs)
            diffs = [k for k in MUST_MATCH if old.get(k) != meta.get(k)]
            if diffs and not overwrite:
                lines = "; ".join(f"{k}: store has {old.get(k)!r}, this build {meta.get(k)!r}" for k in diffs)
                raise StoreError(
                    f"role {role} of {self.path} was built with different settings ({lines}). "
                    "Use another --out, or --overwrite to delete this role and rebuild it"
                )
            if overwrite and diffs:
                shutil.rmtree(rdir)
            else:
                g = zarr.open_group(str(rdir), mode="a")
                g.update_attributes({k: v for k, v in meta.items() if k not in MUST_MATCH})
                g.require_group("prefixes")
                return
        g = self.root.require_group(role)
        g.update_attributes({"schema_version": SCHEMA_VERSION, **meta})
        # Zarr v3 has no implicit groups: create both parents so plain zarr clients can walk them.
        g.require_group("samples")
        g.require_group("prefixes")

    # ----- samples -----
    def _sample_dir(self, role: str, sample_id: str) -> Path:
        return self.path / role / "samples" / check_key(sample_id)

    def sample_status(self, role: str, sample_id: str) -> str:
        """'complete', 'skipped', 'incomplete' (started, not finished) or 'missing'."""
        d = self._sample_dir(role, sample_id)
        zj = d / "zarr.json"
        if not zj.is_file():
            return "incomplete" if d.exists() else "missing"
        try:
            attrs = json.loads(zj.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return "incomplete"
        return attrs.get("status", "incomplete")

    def write_sample(self, role: str, sample_id: str, input_ids, vision, text, maps: list, layers, encoding: Encoding,
                     fault=None, prefix: tuple[str, int] | None = None, after=None, signals: dict | None = None) -> int:
        """Write one sample's arrays, then its completion mark. Returns raw fp16 bytes of attention written.

        maps: per layer, a (T, T) map, or with prefix (key, P) its suffix rows (T - P, T) (the first
        P rows live in the prefix group `key`), or the same already packed by `pack_rows`.
        `after`: a future (the prefix's write) that must finish before this sample is marked complete.
        """
        from drivekd.families.base import token_fingerprint

        d = self._sample_dir(role, sample_id)
        if d.exists():
            shutil.rmtree(d)  # an incomplete earlier attempt
        T = int(input_ids.numel())
        row0 = prefix[1] if prefix else 0
        g = zarr.open_group(str(d), mode="w", attributes={"status": "writing", "length": T})
        vectors = {"input_ids": input_ids.to(torch.int32).numpy(), "vision": vision.numpy(), "text": text.numpy()}
        sums: dict = {"algorithm": ALGORITHM}
        for name, v in vectors.items():
            comp = BloscCodec(cname="zstd", clevel=3) if name == "input_ids" else "auto"
            g.create_array(name, data=v, chunks=(T,), compressors=comp, config=_DENSE)
            sums[name] = checksum(v)
        n = T * (T + 1) // 2 - row0 * (row0 + 1) // 2
        sums["attn"] = self._write_rows(g, maps, len(layers), n, encoding, row0, fault)
        marks = {name: self._signal_mark(g, name, payload, fault) for name, payload in (signals or {}).items()}
        if after is not None:
            after.result()  # the shared prefix is complete before any member is
        mark = {"length": T, "fingerprint": token_fingerprint(input_ids), "layers": list(layers), "checksums": sums}
        if marks:
            mark["signals"] = marks
        if prefix:
            mark.update({"prefix": prefix[0], "prefix_length": row0})
        # The completion mark, last, in ONE zarr.json write: `g.attrs.update` would write the file
        # once per key (MutableMapping.update), and a kill between two of those writes could leave
        # "complete" without the fingerprint.
        g.update_attributes({**mark, "status": "complete"})
        return len(layers) * n * 2 + sum(_payload_bytes(p) for p in (signals or {}).values())

    @staticmethod
    def _signal_mark(g, name: str, payload: dict, fault=None) -> dict:
        from drivekd.store.signals import write_arrays

        sums = write_arrays(g, name, payload, fault)
        mark = {"status": "complete", "checksums": sums}
        if name == "hidden":
            mark["layers"] = list(payload["layers"])
        return mark

    def _drop_signal(self, role: str, name: str) -> None:
        """Remove signal `name` (arrays and marks) from every sample of `role`; attention stays."""
        sdir = self.path / role / "samples"
        for d in sdir.iterdir() if sdir.exists() else []:
            m = self._mark(d)
            if name in m.get("signals", {}):
                zarr.open_group(str(d), mode="a").update_attributes({"signals": {k: v for k, v in m["signals"].items() if k != name}})
                for key in SIGNAL_ARRAYS[name]:
                    shutil.rmtree(d / key, ignore_errors=True)

    def write_signals(self, role: str, sample_id: str, signals: dict, fault=None) -> int:
        """Add signals to a complete sample: their arrays, then ONE zarr.json write that adds their
        marks. The attention arrays and every other file of the sample are not touched."""
        d = self._sample_dir(role, sample_id)
        g = zarr.open_group(str(d), mode="a")
        marks = {name: self._signal_mark(g, name, payload, fault) for name, payload in signals.items()}
        have = dict(self._mark(d).get("signals", {}))
        have.update(marks)
        g.update_attributes({"signals": have})
        return sum(_payload_bytes(p) for p in signals.values())

    def signal_status(self, role: str, sample_id: str, name: str) -> str:
        """'complete' when the sample is complete and carries signal `name` with every file present."""
        if name == "attention":
            return self.sample_status(role, sample_id)
        d = self._sample_dir(role, sample_id)
        m = self._mark(d)
        if m.get("status") != "complete":
            return m.get("status", "missing") if (d / "zarr.json").is_file() else ("incomplete" if d.exists() else "missing")
        return "complete" if not self.signal_missing_files(role, sample_id, name, m) else "missing"

    def signal_missing_files(self, role: str, sample_id: str, name: str, mark: dict | None = None) -> list[Path]:
        from drivekd.store.signals import expected_files as signal_files

        d = self._sample_dir(role, sample_id)
        m = mark if mark is not None else self._mark(d)
        sm = m.get("signals", {}).get(name)
        if not sm or sm.get("status") != "complete":
            return [d / "zarr.json"]
        return absent(signal_files(d, name, len(sm.get("layers", []))))

    @staticmethod
    def _write_rows(g, maps: list, n_layers: int, n: int, encoding: Encoding, row0: int, fault) -> list[str]:
        """The attn array, one chunk per layer row; returns each row's checksum as stored.

        fill_value NaN: any zarr client reading a missing chunk sees NaN, not plausible zeros.
        """
        attn = g.create_array("attn", shape=(n_layers, n), chunks=(1, n), dtype="float16", compressors=encoding.compressor(),
                              fill_value=np.nan, config=_DENSE)
        sums = []
        for k, m in enumerate(maps):
            row = np.ascontiguousarray(encoding.quantise(m) if isinstance(m, np.ndarray) else encode_map(m, encoding, row0), dtype=np.float16)
            attn[k] = row
            sums.append(checksum(row))
            if fault is not None:
                fault()
        return sums

    # ----- shared prefixes (schema 2) -----
    def _prefix_dir(self, role: str, key: str) -> Path:
        return self.path / role / "prefixes" / check_key(key)

    def prefix_status(self, role: str, key: str) -> str:
        zj = self._prefix_dir(role, key) / "zarr.json"
        if not zj.is_file():
            return "missing"
        try:
            return json.loads(zj.read_text()).get("attributes", {}).get("status", "incomplete")
        except (OSError, ValueError):
            return "incomplete"

    def write_prefix(self, role: str, key: str, input_ids, maps: list, layers, encoding: Encoding, members: int, fault=None) -> int:
        """A group's shared prefix block: (P, P) maps, stored once. Complete before any member sample."""
        d = self._prefix_dir(role, key)
        if d.exists():
            shutil.rmtree(d)
        P = int(input_ids.numel())
        g = zarr.open_group(str(d), mode="w", attributes={"status": "writing", "length": P})
        ids = input_ids.to(torch.int32).numpy()
        g.create_array("input_ids", data=ids, chunks=(P,), compressors=BloscCodec(cname="zstd", clevel=3), config=_DENSE)
        n = P * (P + 1) // 2
        sums = {"algorithm": ALGORITHM, "input_ids": checksum(ids), "attn": self._write_rows(g, maps, len(layers), n, encoding, 0, fault)}
        # One write, see write_sample.
        g.update_attributes({"length": P, "members": members, "layers": list(layers), "checksums": sums, "status": "complete"})
        return len(layers) * n * 2

    def mark_skipped(self, role: str, sample_id: str, reason: str) -> None:
        d = self._sample_dir(role, sample_id)
        if d.exists():
            shutil.rmtree(d)
        zarr.open_group(str(d), mode="w", attributes={"status": "skipped", "reason": reason})

    def get(self, role: str, sample_id: str, layers: list[int] | None = None, signals: dict | None = None) -> SampleTargets:
        """A sample's targets; every array read is checked against the checksum written with it.

        signals: {"logits": None, "hidden": [teacher layers]} to read those too."""
        info = self.role_info(role)
        status = self.sample_status(role, sample_id)
        if status != "complete":
            hint = "it was skipped as bad input" if status == "skipped" else f"it is {status}"
            raise StoreError(
                f"sample {sample_id!r} has no complete {role} targets in {self.path} ({hint}); "
                f"run `drivekd-cache build --teacher {role}` again to complete the store"
            )
        want = list(info.layers) if layers is None else [int(l) for l in layers]
        missing = [l for l in want if l not in info.layers]
        if missing:
            raise StoreError(f"role {role} of {self.path} stores layers {list(info.layers)}, not {missing}; rebuild with --layers")
        d = self._sample_dir(role, sample_id)
        g = zarr.open_group(str(d), mode="r")
        attrs = dict(g.attrs)
        T = int(attrs["length"])
        sums = attrs.get("checksums")
        where = f"{role} targets of sample {sample_id!r}"
        pd, pg, psums = None, None, None
        if attrs.get("prefix"):
            key = attrs["prefix"]
            if self.prefix_status(role, key) != "complete":
                raise StoreError(f"sample {sample_id!r}: its shared prefix {key} in role {role} is not complete; run the build again")
            pd = self._prefix_dir(role, key)
            pg = zarr.open_group(str(pd), mode="r")
            psums = pg.attrs.get("checksums")
        attn = self._open(d, "attn", where, g)
        pattn = self._open(pd, "attn", f"{where} (shared prefix {attrs['prefix']})", pg) if pd is not None else None
        maps = {}
        for l in want:
            k = info.layers.index(l)
            packed = self._read(attn, d, "attn", k, sums, f"{where}, layer {l}")
            if pattn is not None:
                # Row-major lower triangle: the prefix rows come first, then the suffix rows.
                head = self._read(pattn, pd, "attn", k, psums, f"{where}, layer {l} (shared prefix {attrs['prefix']}, used by other samples too)")
                packed = np.concatenate([head, packed])
            maps[l] = decode_map(packed, T)
        vision = self._read(self._open(d, "vision", where, g), d, "vision", None, sums, where)
        text = self._read(self._open(d, "text", where, g), d, "text", None, sums, where)
        out = SampleTargets(sample_id, attrs["fingerprint"], torch.from_numpy(vision), torch.from_numpy(text), maps)
        for name, sig_layers in (signals or {}).items():
            setattr(out, name, self._read_signal(role, sample_id, d, g, attrs, name, sig_layers))
        return out

    def _read_signal(self, role: str, sample_id: str, d: Path, g, attrs: dict, name: str, layers: list[int] | None):
        """One signal of a complete sample, each array checked against its mark's checksum."""
        from drivekd.store.signals import chunk_of
        from drivekd.store.targets import HiddenTargets, LogitTargets

        where = f"{role} {name} targets of sample {sample_id!r}"
        sm = attrs.get("signals", {}).get(name)
        if not sm or sm.get("status") != "complete":
            raise StoreError(f"{where}: not in the store (the sample has {', '.join(['attention', *attrs.get('signals', {})])}); add them with "
                             f"`drivekd-cache build --teacher {role} --signals {name}` (computes only what is missing)")
        sums = sm["checksums"]

        def read(key: str, row: int | None = None) -> np.ndarray:
            arr = self._open(d, key, where, g)
            f = chunk_of(d, key, row)
            try:
                v = np.asarray(arr[row] if row is not None else arr[...])
            except Exception as e:  # noqa: BLE001 - any decoder failure is damage of this chunk
                raise StoreError(f"{where}: chunk {f} is unreadable ({type(e).__name__}: {e}); {self._fix()}") from None
            expected = sums[key][row] if row is not None else sums[key]
            if checksum(v) != expected:
                what = "is missing" if not f.is_file() else f"does not match the {ALGORITHM} checksum written with it"
                raise StoreError(f"{where}: chunk file {f} {what}; {self._fix()}")
            return v

        if name == "logits":
            return LogitTargets(torch.from_numpy(read("logits_pos").astype(np.int64)), torch.from_numpy(read("logits_lp").astype(np.float32)),
                                torch.from_numpy(read("logits_idx").astype(np.int64)), torch.from_numpy(read("logits_tail").astype(np.float32)))
        stored = list(sm.get("layers", []))
        want = stored if layers is None else [int(l) for l in layers]
        missing = [l for l in want if l not in stored]
        if missing:
            raise StoreError(f"{where}: hidden states of teacher layers {missing} are not stored (have {stored}); rebuild the role with --layers")
        pos = torch.from_numpy(read("hidden_pos").astype(np.int64))
        return HiddenTargets(pos, {l: torch.from_numpy(read("hidden", stored.index(l)).astype(np.float32)) for l in want})

    def _fix(self) -> str:
        return (f"the store is damaged: `drivekd-cache verify {self.path}` lists every damaged sample, "
                f"`drivekd-cache verify --repair {self.path}` removes them and `drivekd-cache build` rebuilds them")

    def _open(self, gdir: Path, name: str, where: str, group=None):
        """An array of a sample/prefix group; through its opened `group` when given (~2.5x cheaper)."""
        try:
            return group[name] if group is not None else zarr.open_array(str(gdir / name), mode="r")
        except Exception as e:  # noqa: BLE001 - absent or unreadable metadata
            if not (gdir / name / "zarr.json").is_file():
                raise StoreError(f"{where}: array {gdir / name} is missing (no zarr.json); {self._fix()}") from None
            raise StoreError(f"{where}: array metadata {gdir / name / 'zarr.json'} is unreadable ({type(e).__name__}: {e}); {self._fix()}") from None

    def _read(self, arr, gdir: Path, name: str, row: int | None, sums: dict | None, where: str) -> np.ndarray:
        """One array (or one layer row of attn) as stored, checked against its recorded checksum.

        Without checksums (schema <= 2) a missing attn chunk is still refused: zarr would return
        the fill value (zeros in those stores) as if it were a map.
        """
        f = chunk_file(gdir, name, row)
        try:
            v = np.asarray(arr[row] if row is not None else arr[:])
        except Exception as e:  # noqa: BLE001 - any decoder failure is damage of this chunk
            raise StoreError(f"{where}: chunk {f} is unreadable ({type(e).__name__}: {e}); {self._fix()}") from None
        expected = None
        if sums is not None:
            expected = sums["attn"][row] if row is not None else sums.get(name)
        if expected is not None:
            if checksum(v) != expected:
                what = "is missing" if not f.is_file() else f"does not match the {ALGORITHM} checksum written with it"
                raise StoreError(f"{where}: chunk file {f} {what}; {self._fix()}")
        elif row is not None and not f.is_file():
            raise StoreError(f"{where}: chunk file {f} is missing (this store has no checksums; zarr would read zeros); {self._fix()}")
        return v

    def read_input_ids(self, role: str, sample_id: str) -> torch.Tensor:
        d = self._sample_dir(role, sample_id)
        sums = zarr.open_group(str(d), mode="r").attrs.get("checksums")
        where = f"{role} token ids of sample {sample_id!r}"
        v = self._read(self._open(d, "input_ids", where), d, "input_ids", None, sums, where)
        return torch.from_numpy(v.astype(np.int64))

    def fingerprint(self, role: str, sample_id: str) -> str | None:
        """The token fingerprint in a complete sample's mark (no array read); None if not complete."""
        zj = self._sample_dir(role, sample_id) / "zarr.json"
        try:
            attrs = json.loads(zj.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        return attrs.get("fingerprint") if attrs.get("status") == "complete" else None

    def content_digest(self, role: str, sample_ids: list[str]) -> str:
        """A digest of the targets these samples read: each complete sample's checksums (and its
        shared prefix's) from their marks, no array read. Equal digests: the same stored values,
        wherever the store was copied. Stores without checksums digest the token fingerprints."""
        h = hashlib.sha256()
        prefixes: dict[str, object] = {}
        for sid in sample_ids:
            m = self._mark(self._sample_dir(role, sid))
            key = m.get("prefix")
            if key and key not in prefixes:
                prefixes[key] = self._mark(self._prefix_dir(role, key)).get("checksums")
            # Signals (logits, hidden) are not digested: adding them to the store later must not
            # change the identity of attention runs that read it.
            h.update(json.dumps([sid, m.get("status"), m.get("fingerprint"), m.get("checksums"), prefixes.get(key)], sort_keys=True).encode())
        return h.hexdigest()

    # ----- structure: every file of a complete sample present -----
    def _mark(self, d: Path) -> dict:
        try:
            return json.loads((d / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return {}

    def prefix_missing_files(self, role: str, key: str) -> list[Path]:
        d = self._prefix_dir(role, key)
        m = self._mark(d)
        if m.get("status") != "complete":
            return [d / "zarr.json"]
        return absent(expected_files(d, PREFIX_VECTORS, len(m.get("layers", []))))

    def missing_files(self, role: str, sample_id: str) -> list[Path]:
        """Files a complete sample (and its shared prefix) should have but does not: cheap (stat only).

        A sample marked complete by a build that raced another, or damaged later, is not done:
        the next build rebuilds it. In a checksummed store a mark without checksums is damage too.
        """
        d = self._sample_dir(role, sample_id)
        m = self._mark(d)
        n_layers = len(m["layers"] if "layers" in m else self.role_meta(role)["layers"])
        files = absent(expected_files(d, SAMPLE_VECTORS, n_layers))
        if self.checksummed and "checksums" not in m:
            files.append(d / "zarr.json")
        if m.get("prefix"):
            files += self.prefix_missing_files(role, m["prefix"])
        return files

    def is_done(self, role: str, sample_id: str, signals: tuple[str, ...] = ()) -> bool:
        """Complete (or recorded as skipped) with every file present, `signals` included: a build need not redo it."""
        st = self.sample_status(role, sample_id)
        if st == "skipped":
            return True
        if st != "complete" or self.missing_files(role, sample_id):
            return False
        return all(not self.signal_missing_files(role, sample_id, n) for n in signals if n != "attention")

    # ----- reporting -----
    def sample_bytes(self, role: str, probe: int = 16) -> int | None:
        """Mean bytes on disk of a complete sample of `role` (a few probed; shared prefixes shared
        out over their members); None when none is complete yet."""
        sdir = self.path / role / "samples"
        sizes = []
        for d in sdir.iterdir() if sdir.exists() else []:
            m = self._mark(d)
            if m.get("status") == "complete":
                b = _dir_bytes(d)
                if m.get("prefix"):
                    pm = self._mark(self._prefix_dir(role, m["prefix"]))
                    b += _dir_bytes(self._prefix_dir(role, m["prefix"])) // max(1, int(pm.get("members", 1)))
                sizes.append(b)
                if len(sizes) >= probe:
                    break
        return int(sum(sizes) / len(sizes)) if sizes else None

    def summary(self, role: str) -> dict:
        meta = self.role_meta(role)
        ids = meta.get("sample_ids", [])
        counts = {"complete": 0, "skipped": 0, "incomplete": 0, "missing": 0}
        raw = 0
        skipped_ids = []
        for sid in ids:
            st = self.sample_status(role, sid)
            counts[st] += 1
            if st == "skipped":
                skipped_ids.append(sid)
        nl = len(meta["layers"])
        sdir = self.path / role / "samples"
        attn_bytes = 0
        tril_entries = 0  # entries every complete sample's full lower triangles would hold
        signal_bytes: dict[str, int] = {}  # logits / hidden arrays on disk
        prefix_use: dict[str, int] = {}
        for d in sdir.iterdir() if sdir.exists() else []:
            zj = d / "zarr.json"
            if not zj.is_file():
                continue
            attrs = json.loads(zj.read_text()).get("attributes", {})
            if attrs.get("status") == "complete":
                T = int(attrs["length"])
                raw += nl * T * T * 2  # fp16 square maps
                tril_entries += nl * T * (T + 1) // 2
                attn_bytes += _dir_bytes(d / "attn")
                for name in attrs.get("signals", {}):
                    signal_bytes[name] = signal_bytes.get(name, 0) + sum(_dir_bytes(d / k) for k in SIGNAL_ARRAYS.get(name, ()))
                if attrs.get("prefix"):
                    prefix_use[attrs["prefix"]] = prefix_use.get(attrs["prefix"], 0) + 1
        stored_entries = 0
        for key in prefix_use:
            attn_bytes += _dir_bytes(self._prefix_dir(role, key) / "attn")
        pdir = self.path / role / "prefixes"
        for d in pdir.iterdir() if pdir.exists() else []:
            zj = d / "zarr.json"
            if zj.is_file() and d.name in prefix_use:
                P = int(json.loads(zj.read_text())["attributes"]["length"])
                stored_entries -= nl * P * (P + 1) // 2 * (prefix_use[d.name] - 1)  # kept once, used n times
        groups = len(prefix_use)
        return {
            "role": role,
            "schema_version": self.schema_version,
            "checksums": self.checksummed,
            "teacher": meta.get("teacher_path"),
            "teacher_fingerprint": meta.get("teacher_fingerprint", "")[:16],
            "family": meta.get("family"),
            "layers": meta.get("layers"),
            "encoding": meta.get("encoding"),
            **counts,
            "skipped_ids": skipped_ids,
            "bytes_on_disk": _dir_bytes(self.path / role),
            "attn_bytes": attn_bytes,
            "fp16_square_bytes": raw,
            "compression_ratio": (raw / attn_bytes) if attn_bytes else None,
            "prefix_groups": groups,
            "questions_per_group": (sum(prefix_use.values()) / groups) if groups else None,
            "unshared_samples": counts["complete"] - sum(prefix_use.values()),
            # fp16 bytes of lower-triangle entries not stored thanks to sharing (before compression)
            "bytes_saved_by_sharing": -stored_entries * 2,
            "tril_fp16_bytes": tril_entries * 2,
            "signals": meta.get("signals", {}),
            "signal_bytes": signal_bytes,
        }

    def verify(self, role: str, quick: bool = False) -> list["Problem"]:
        """Every expected sample complete, every file present and, unless `quick`, every array equal
        to the checksum written with it (shared prefixes included) and its token fingerprint
        consistent. Returns the problems found (empty: the role is sound)."""
        from drivekd.families.base import token_fingerprint

        problems: list[Problem] = []
        bad_prefix: dict[str, str] = {}  # key -> problem, checked once however many members use it
        extra = list(self.role_meta(role).get("signals", {}))  # logits / hidden, every sample must carry them
        for sid in self.role_meta(role).get("sample_ids", []):
            st = self.sample_status(role, sid)
            if st == "skipped":
                continue
            if st != "complete":
                problems.append(Problem(role, sid, st))
                continue
            gone = self.missing_files(role, sid)
            if gone:
                problems.append(Problem(role, sid, f"marked complete but {len(gone)} file(s) are missing, e.g. {gone[0]}"))
                continue
            sig_problem = self._verify_signals(role, sid, extra, quick)
            if sig_problem:
                problems.append(Problem(role, sid, sig_problem))
                continue
            if quick:
                continue
            try:
                ids = self.read_input_ids(role, sid)
                mark = self._mark(self._sample_dir(role, sid))
                key = mark.get("prefix")
                if key and key not in bad_prefix:
                    bad_prefix[key] = self._verify_prefix(role, key)
                if key and bad_prefix[key]:
                    problems.append(Problem(role, sid, bad_prefix[key], prefix=key))
                    continue
                t = self.get(role, sid)  # checks every array's checksum
                if key:
                    pd = self._prefix_dir(role, key)
                    pids = self._read(self._open(pd, "input_ids", key), pd, "input_ids", None, None, key)
                    if not np.array_equal(pids, ids[: pids.size].numpy()):
                        problems.append(Problem(role, sid, f"token ids do not start with its shared prefix {key}"))
                if token_fingerprint(ids) != t.fingerprint:
                    problems.append(Problem(role, sid, "fingerprint does not match the stored token ids"))
                if not (t.vision.numel() == t.text.numel() == ids.numel()):
                    problems.append(Problem(role, sid, "masks and token ids differ in length"))
                if not self.checksummed:  # no checksums to compare: at least no NaN/inf
                    for l, m in t.maps.items():
                        if not torch.isfinite(m).all():
                            problems.append(Problem(role, sid, f"layer {l} has non-finite values"))
            except Exception as e:  # noqa: BLE001 - verify reports every unreadable sample
                problems.append(Problem(role, sid, f"unreadable ({e})" if isinstance(e, StoreError) else f"unreadable ({type(e).__name__}: {e})"))
        return problems

    def _verify_signals(self, role: str, sid: str, names: list[str], quick: bool) -> str:
        """'' when the sample carries every signal the role lists, complete and (unless quick)
        equal to its checksums; else what is wrong."""
        for name in names:
            if self.signal_status(role, sid, name) != "complete":
                m = self._mark(self._sample_dir(role, sid)).get("signals", {}).get(name)
                what = "missing" if not m else f"marked complete but {len(self.signal_missing_files(role, sid, name))} file(s) are missing"
                return f"{name} {what} (`drivekd-cache build --teacher {role} --signals {name}` adds it)"
            if not quick:
                d = self._sample_dir(role, sid)
                try:
                    self._read_signal(role, sid, d, zarr.open_group(str(d), mode="r"), self._mark(d), name, None)
                except StoreError as e:
                    return f"{name} unreadable ({e})"
        return ""

    def _verify_prefix(self, role: str, key: str) -> str:
        """'' when the shared prefix reads back equal to its checksums, else what is wrong."""
        d = self._prefix_dir(role, key)
        try:
            mark = self._mark(d)
            sums = mark.get("checksums")
            where = f"shared prefix {key}"
            self._read(self._open(d, "input_ids", where), d, "input_ids", None, sums, where)
            attn = self._open(d, "attn", where)
            for k in range(len(mark.get("layers", []))):
                self._read(attn, d, "attn", k, sums, f"{where}, layer {mark['layers'][k]}")
        except StoreError as e:
            return f"its shared prefix is damaged ({e})"
        return ""

    def repair(self, problems: list["Problem"]) -> list[Path]:
        """Delete the damaged sample and prefix groups that `verify` found, so that the next build
        rebuilds them (a sample whose prefix is gone is not done). The caller holds the role locks."""
        removed = []
        for p in problems:
            for d in ([self._prefix_dir(p.role, p.prefix)] if p.prefix else []) + [self._sample_dir(p.role, p.sample_id)]:
                if d.exists():
                    shutil.rmtree(d)
                    removed.append(d)
        return removed


@dataclass(frozen=True)
class Problem:
    """One finding of `TeacherStore.verify`: a sample (and, if the damage is there, its shared prefix)."""

    role: str
    sample_id: str
    message: str
    prefix: str | None = None

    def __str__(self) -> str:
        return f"{self.role}/{self.sample_id}: {self.message}"

    def __contains__(self, text: str) -> bool:  # reads like the message strings verify used to return
        return text in str(self)
