"""Reading a teacher store: roles, sample status, and targets checked against their checksums.

`StoreReader` implements `drivekd.store.targets.TargetSource` over the format of drivekd.store.format;
`drivekd.store.TeacherStore` adds writing (drivekd.store.writer) and verify/repair/summary
(drivekd.store.maintenance). Every file access goes through a `drivekd.store.backend.Backend`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import zarr

from drivekd.errors import StoreError
from drivekd.roles import ROLES
from drivekd.store.backend import Backend, LocalBackend
from drivekd.store.format import READABLE_VERSIONS, SCHEMA_VERSION, check_key, decode_map
from drivekd.store.integrity import ALGORITHM, PREFIX_VECTORS, SAMPLE_VECTORS, checksum, chunk_file, expected_files
from drivekd.store.signals import chunk_of
from drivekd.store.signals import expected_files as signal_files
from drivekd.store.targets import HiddenTargets, LogitTargets, RoleInfo, SampleTargets


class StoreReader:
    """Reader of a teacher store. Implements `TargetSource` (all of it)."""

    def __init__(self, path: str | Path, mode: str = "r", backend: Backend | None = None):
        """Open the store at `path` (a local directory unless `backend` says where it lives).
        mode "r" reads a complete or partial store; "a" (StoreWriter) creates or extends one."""
        self.backend = backend or LocalBackend(path)
        self.path = self.backend.root
        self.mode = mode
        self._meta_cache: dict[str, dict] = {}
        if mode == "r":
            self._open_read()
        else:
            self._open_write()

    def _open_read(self) -> None:
        if not self.backend.is_file(self.path / "zarr.json"):
            raise StoreError(f"no teacher store at {self.path}; build one with `drivekd-cache build --out {self.path}`")
        self.root = self._group(self.path)
        meta = dict(self.root.attrs).get("drivekd", {})
        version = meta.get("schema_version")
        self.schema_version = version
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.path}: store schema version {version!r}, this drivekd reads {SCHEMA_VERSION}; "
                "rebuild it with `drivekd-cache build --overwrite`"
            )

    def _open_write(self) -> None:
        raise StoreError(f"{self.path}: a StoreReader only reads (mode 'r'); open a TeacherStore with mode 'a' to write")

    def _group(self, loc: Path, mode: str = "r"):
        """The zarr group at a location of this store."""
        return zarr.open_group(self.backend.zarr_location(loc), mode=mode)

    def _absent(self, files: list[Path]) -> list[Path]:
        """Those of `files` the backend does not hold (stat only, no read)."""
        return [f for f in files if not self.backend.is_file(f)]

    @property
    def checksummed(self) -> bool:
        """Whether samples carry checksums (schema 3 and later)."""
        return (self.schema_version or 0) >= 3

    def roles(self) -> list[str]:
        return [r for r in ROLES if self.backend.is_file(self.path / r / "zarr.json")]

    def role_meta(self, role: str) -> dict:
        # Cached: the attrs hold every sample id, and readers ask once per sample.
        if role in self._meta_cache:
            return self._meta_cache[role]
        if role not in self.roles():
            raise StoreError(
                f"role {role!r} is not in store {self.path} (have: {', '.join(self.roles()) or 'none'}); "
                f"build it with `drivekd-cache build --teacher {role}`"
            )
        meta = dict(self._group(self.path / role).attrs)
        if self.mode == "r":
            self._meta_cache[role] = meta
        return meta

    def role_info(self, role: str) -> RoleInfo:
        m = self.role_meta(role)
        return RoleInfo(role, tuple(m["layers"]), int(m["num_teacher_layers"]), m["checkpoint_fingerprint"], m["family"], m["processor_fingerprint"],
                        dict(m.get("signals", {})))

    def _sample_dir(self, role: str, sample_id: str) -> Path:
        return self.path / role / "samples" / check_key(sample_id)

    def _prefix_dir(self, role: str, key: str) -> Path:
        return self.path / role / "prefixes" / check_key(key)

    def sample_group(self, role: str, sample_id: str):
        """A sample's zarr group, read-only, as drivekd.store.format lays it out (attrs; arrays attn,
        vision, text, input_ids, ...), read unchecked: for tools that measure or inspect the stored
        format. Targets are read through `get`, which checks every array against its checksum."""
        return self._group(self._sample_dir(role, sample_id))

    def prefix_group(self, role: str, key: str):
        """A shared prefix's zarr group (its attn rows), read-only and unchecked, like `sample_group`."""
        return self._group(self._prefix_dir(role, key))

    def _mark(self, d: Path) -> dict:
        try:
            return self.backend.read_json(d / "zarr.json").get("attributes", {})
        except (OSError, ValueError):
            return {}

    def sample_status(self, role: str, sample_id: str) -> str:
        """'complete', 'skipped', 'incomplete' (started, not finished) or 'missing'."""
        d = self._sample_dir(role, sample_id)
        zj = d / "zarr.json"
        if not self.backend.is_file(zj):
            return "incomplete" if self.backend.exists(d) else "missing"
        try:
            attrs = self.backend.read_json(zj).get("attributes", {})
        except (OSError, ValueError):
            return "incomplete"
        return attrs.get("status", "incomplete")

    def signal_status(self, role: str, sample_id: str, name: str) -> str:
        """'complete' when the sample is complete and carries signal `name` with every file present."""
        if name == "attention":
            return self.sample_status(role, sample_id)
        d = self._sample_dir(role, sample_id)
        m = self._mark(d)
        if m.get("status") != "complete":
            return m.get("status", "missing") if self.backend.is_file(d / "zarr.json") else ("incomplete" if self.backend.exists(d) else "missing")
        return "complete" if not self.signal_missing_files(role, sample_id, name, m) else "missing"

    def signal_missing_files(self, role: str, sample_id: str, name: str, mark: dict | None = None) -> list[Path]:
        d = self._sample_dir(role, sample_id)
        m = mark if mark is not None else self._mark(d)
        sm = m.get("signals", {}).get(name)
        if not sm or sm.get("status") != "complete":
            return [d / "zarr.json"]
        return self._absent(signal_files(d, name, len(sm.get("layers", []))))

    def prefix_status(self, role: str, key: str) -> str:
        zj = self._prefix_dir(role, key) / "zarr.json"
        if not self.backend.is_file(zj):
            return "missing"
        try:
            return self.backend.read_json(zj).get("attributes", {}).get("status", "incomplete")
        except (OSError, ValueError):
            return "incomplete"

    def prefix_missing_files(self, role: str, key: str) -> list[Path]:
        d = self._prefix_dir(role, key)
        m = self._mark(d)
        if m.get("status") != "complete":
            return [d / "zarr.json"]
        return self._absent(expected_files(d, PREFIX_VECTORS, len(m.get("layers", []))))

    def missing_files(self, role: str, sample_id: str) -> list[Path]:
        """Files a complete sample (and its shared prefix) should have but does not: cheap (stat only).

        A sample marked complete by a build that raced another, or damaged later, is not done:
        the next build rebuilds it. In a checksummed store a mark without checksums is damage too.
        """
        d = self._sample_dir(role, sample_id)
        m = self._mark(d)
        n_layers = len(m["layers"] if "layers" in m else self.role_meta(role)["layers"])
        files = self._absent(expected_files(d, SAMPLE_VECTORS, n_layers))
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

    def fingerprint(self, role: str, sample_id: str) -> str | None:
        """The token fingerprint in a complete sample's mark (no array read); None if not complete."""
        zj = self._sample_dir(role, sample_id) / "zarr.json"
        try:
            attrs = self.backend.read_json(zj).get("attributes", {})
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
        g = self._group(d)
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
            pg = self._group(pd)
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

    def read_input_ids(self, role: str, sample_id: str) -> torch.Tensor:
        """The teacher's token ids (T,) int64, checked against their checksum."""
        d = self._sample_dir(role, sample_id)
        sums = self._group(d).attrs.get("checksums")
        where = f"{role} token ids of sample {sample_id!r}"
        v = self._read(self._open(d, "input_ids", where), d, "input_ids", None, sums, where)
        return torch.from_numpy(v.astype(np.int64))

    def _read_signal(self, role: str, sample_id: str, d: Path, g, attrs: dict, name: str, layers: list[int] | None):
        """One signal of a complete sample, each array checked against its mark's checksum."""
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
                what = "is missing" if not self.backend.is_file(f) else f"does not match the {ALGORITHM} checksum written with it"
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
            return group[name] if group is not None else zarr.open_array(self.backend.zarr_location(gdir / name), mode="r")
        except Exception as e:  # noqa: BLE001 - absent or unreadable metadata
            if not self.backend.is_file(gdir / name / "zarr.json"):
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
                what = "is missing" if not self.backend.is_file(f) else f"does not match the {ALGORITHM} checksum written with it"
                raise StoreError(f"{where}: chunk file {f} {what}; {self._fix()}")
        elif row is not None and not self.backend.is_file(f):
            raise StoreError(f"{where}: chunk file {f} is missing (this store has no checksums; zarr would read zeros); {self._fix()}")
        return v
