"""Writing a teacher store: roles, samples, shared prefixes and signals, each marked complete last.

Every sample (and shared prefix) is written as its arrays first, then ONE write of its group's
`zarr.json` that marks it complete and records the checksums (drivekd.store.format says why), so a
killed build leaves at worst incomplete groups, which the next build redoes.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from drivekd.errors import StoreError
from drivekd.store.format import DENSE, MUST_MATCH, SCHEMA_VERSION, Encoding, encode_map
from drivekd.store.integrity import ALGORITHM, NonFiniteTargets, checksum, nonfinite
from drivekd.store.reader import StoreReader
from drivekd.store.signals import ARRAYS as SIGNAL_ARRAYS
from drivekd.store.signals import write_arrays


def _payload_bytes(payload: dict) -> int:
    """Raw bytes of a signal payload's arrays (before compression)."""
    return sum(v.nbytes for v in payload.values() if isinstance(v, np.ndarray))


# Signal arrays whose -inf is a value: a top-k log-probability, or the tail's log-mass when top-k
# covers the whole vocabulary, can be log 0. NaN and +inf never are.
_NEG_INF_OK = ("logits_lp", "logits_tail")


def _check_signals(role: str, sample_id: str, signals: dict) -> None:
    """Refuse a sample whose signal arrays hold NaN/inf, before any of them is written."""
    for name, payload in signals.items():
        for key, v in payload.items():
            if isinstance(v, np.ndarray):
                bad = nonfinite(v, allow_neg_inf=key in _NEG_INF_OK)
                if bad:
                    raise NonFiniteTargets(role, sample_id, f"{name} array {key}: {bad}")


class StoreWriter(StoreReader):
    """A reader that also writes (mode "a"); the teacher pass (drivekd.teacher.build) drives it."""

    def _open_write(self) -> None:
        """Create the store (root group with its schema version), or open one this drivekd writes."""
        self.backend.prepare()
        self.root = self._group(self.path, "a")
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

    def init_role(self, role: str, meta: dict, overwrite: bool = False) -> None:
        """Create the role group, or check that an existing one was built with the same settings."""
        rdir = self.path / role
        if self.backend.is_file(rdir / "zarr.json"):
            old = dict(self._group(rdir).attrs)
            diffs = [k for k in MUST_MATCH if old.get(k) != meta.get(k)]
            if diffs and not overwrite:
                lines = "; ".join(f"{k}: store has {old.get(k)!r}, this build {meta.get(k)!r}" for k in diffs)
                raise StoreError(
                    f"role {role} of {self.path} was built with different settings ({lines}). "
                    "Use another --out, or --overwrite to delete this role and rebuild it"
                )
            if overwrite and diffs:
                self.backend.delete(rdir)
            else:
                g = self._group(rdir, "a")
                g.update_attributes({k: v for k, v in meta.items() if k not in MUST_MATCH})
                g.require_group("prefixes")
                return
        g = self.root.require_group(role)
        g.update_attributes({"schema_version": SCHEMA_VERSION, **meta})
        # Zarr v3 has no implicit groups: create both parents so plain zarr clients can walk them.
        g.require_group("samples")
        g.require_group("prefixes")

    def add_signals(self, role: str, settings: dict[str, dict], overwrite: bool = False) -> None:
        """Record that `role` stores these signals (besides attention), with their settings. A
        signal already recorded with other settings (another --logits-top-k) is refused."""
        g = self._group(self.path / role, "a")
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

    def write_sample(self, role: str, sample_id: str, input_ids, vision, text, maps: list, layers, encoding: Encoding,
                     fault=None, prefix: tuple[str, int] | None = None, after=None, signals: dict | None = None) -> int:
        """Write one sample's arrays, then its completion mark. Returns raw fp16 bytes of attention written.

        maps: per layer, a (T, T) map, or with prefix (key, P) its suffix rows (T - P, T) (the first
        P rows live in the prefix group `key`), or the same already packed by `pack_rows`.
        `after`: a future (the prefix's write) that must finish before this sample is marked complete.
        """
        from drivekd.families.base import token_fingerprint  # lazy: the store loads no model family code to read

        d = self._sample_dir(role, sample_id)
        _check_signals(role, sample_id, signals or {})
        self.backend.delete(d)  # an incomplete earlier attempt
        T = int(input_ids.numel())
        row0 = prefix[1] if prefix else 0
        g = zarr.open_group(self.backend.zarr_location(d), mode="w", attributes={"status": "writing", "length": T})
        vectors = {"input_ids": input_ids.to(torch.int32).numpy(), "vision": vision.numpy(), "text": text.numpy()}
        sums: dict = {"algorithm": ALGORITHM}
        for name, v in vectors.items():
            comp = BloscCodec(cname="zstd", clevel=3) if name == "input_ids" else "auto"
            g.create_array(name, data=v, chunks=(T,), compressors=comp, config=DENSE)
            sums[name] = checksum(v)
        n = T * (T + 1) // 2 - row0 * (row0 + 1) // 2
        sums["attn"] = self._write_rows(g, maps, layers, n, encoding, row0, fault, role, sample_id)
        marks = {name: self._signal_mark(g, name, payload, fault) for name, payload in (signals or {}).items()}
        if after is not None:
            try:
                after.result()  # the shared prefix is complete before any member is
            except NonFiniteTargets as e:  # never complete: its first P rows would be NaN
                raise NonFiniteTargets(role, sample_id, f"its shared prefix {prefix[0]}: {e.what}") from None
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

    def write_prefix(self, role: str, key: str, input_ids, maps: list, layers, encoding: Encoding, members: int, fault=None) -> int:
        """A group's shared prefix block: (P, P) maps, stored once. Complete before any member sample."""
        d = self._prefix_dir(role, key)
        self.backend.delete(d)
        P = int(input_ids.numel())
        g = zarr.open_group(self.backend.zarr_location(d), mode="w", attributes={"status": "writing", "length": P})
        ids = input_ids.to(torch.int32).numpy()
        g.create_array("input_ids", data=ids, chunks=(P,), compressors=BloscCodec(cname="zstd", clevel=3), config=DENSE)
        n = P * (P + 1) // 2
        sums = {"algorithm": ALGORITHM, "input_ids": checksum(ids), "attn": self._write_rows(g, maps, layers, n, encoding, 0, fault, role, None)}
        # One write, see write_sample.
        g.update_attributes({"length": P, "members": members, "layers": list(layers), "checksums": sums, "status": "complete"})
        return len(layers) * n * 2

    def write_signals(self, role: str, sample_id: str, signals: dict, fault=None) -> int:
        """Add signals to a complete sample: their arrays, then ONE zarr.json write that adds their
        marks. The attention arrays and every other file of the sample are not touched."""
        d = self._sample_dir(role, sample_id)
        _check_signals(role, sample_id, signals)
        g = self._group(d, "a")
        marks = {name: self._signal_mark(g, name, payload, fault) for name, payload in signals.items()}
        have = dict(self._mark(d).get("signals", {}))
        have.update(marks)
        g.update_attributes({"signals": have})
        return sum(_payload_bytes(p) for p in signals.values())

    def mark_skipped(self, role: str, sample_id: str, reason: str) -> None:
        """Record the sample as skipped (bad input, non-finite targets) with the reason `info` lists."""
        d = self._sample_dir(role, sample_id)
        self.backend.delete(d)
        zarr.open_group(self.backend.zarr_location(d), mode="w", attributes={"status": "skipped", "reason": reason})

    @staticmethod
    def _signal_mark(g, name: str, payload: dict, fault=None) -> dict:
        sums = write_arrays(g, name, payload, fault)
        mark = {"status": "complete", "checksums": sums}
        if name == "hidden":
            mark["layers"] = list(payload["layers"])
        return mark

    def _drop_signal(self, role: str, name: str) -> None:
        """Remove signal `name` (arrays and marks) from every sample of `role`; attention stays."""
        sdir = self.path / role / "samples"
        for d in self.backend.children(sdir):
            m = self._mark(d)
            if name in m.get("signals", {}):
                self._group(d, "a").update_attributes({"signals": {k: v for k, v in m["signals"].items() if k != name}})
                for key in SIGNAL_ARRAYS[name]:
                    self.backend.delete(d / key)

    @staticmethod
    def _write_rows(g, maps: list, layers: list, n: int, encoding: Encoding, row0: int, fault, role: str, sample_id: str | None) -> list[str]:
        """The attn array, one chunk per layer row; returns each row's checksum as stored.

        fill_value NaN: any zarr client reading a missing chunk sees NaN, not plausible zeros.
        Each row is checked finite as stored (fp16: an fp32 value above 65504 becomes inf) before
        it is written: a NaN teacher never leaves a complete sample (NonFiniteTargets).
        """
        attn = g.create_array("attn", shape=(len(layers), n), chunks=(1, n), dtype="float16", compressors=encoding.compressor(),
                              fill_value=np.nan, config=DENSE)
        sums = []
        for k, m in enumerate(maps):
            row = np.ascontiguousarray(encoding.quantise(m) if isinstance(m, np.ndarray) else encode_map(m, encoding, row0), dtype=np.float16)
            bad = nonfinite(row)
            if bad:
                raise NonFiniteTargets(role, sample_id, f"layer {layers[k]} attention: {bad}")
            attn[k] = row
            sums.append(checksum(row))
            if fault is not None:
                fault()
        return sums
