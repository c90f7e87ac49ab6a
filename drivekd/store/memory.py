"""A `TargetSource` held in memory: targets computed on the fly (drivekd.teacher.online), read
whole from a store (tools/bench_train.py), or written by hand in tests.

It answers the whole contract as the Zarr store does, so the trainer never asks which one it has:
a held sample is 'complete', anything else 'missing' (memory has no half-written samples).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import torch

from drivekd.errors import StoreError
from drivekd.roles import ROLES
from drivekd.store.targets import RoleInfo, SampleTargets


class InMemoryTargets:
    """A `TargetSource` over a dict {role: {sample_id: SampleTargets}}.

    meta: per role, the build metadata a store would record (drivekd.store.targets.TargetSource.role_meta);
    a role without it reports none.
    """

    def __init__(self, infos: dict[str, RoleInfo], targets: dict[str, dict[str, SampleTargets]], meta: dict[str, dict] | None = None):
        self._infos = infos
        self._targets = targets
        self._meta = meta or {}

    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self._infos]

    def role_info(self, role: str) -> RoleInfo:
        if role not in self._infos:
            raise StoreError(f"role {role!r} is not in the targets (have: {', '.join(self.roles()) or 'none'})")
        return self._infos[role]

    def role_meta(self, role: str) -> dict:
        self.role_info(role)  # a role not held is an error, as in the store
        return dict(self._meta.get(role, {}))

    def _held(self, role: str, sample_id: str) -> SampleTargets | None:
        return self._targets.get(role, {}).get(sample_id) if role in self._infos else None

    def sample_status(self, role: str, sample_id: str) -> str:
        return "complete" if self._held(role, sample_id) is not None else "missing"

    def signal_status(self, role: str, sample_id: str, name: str) -> str:
        t = self._held(role, sample_id)
        if t is None:
            return "missing"
        return "complete" if name == "attention" or getattr(t, name) is not None else "missing"

    def get(self, role: str, sample_id: str, layers: list[int] | None = None, signals: dict | None = None) -> SampleTargets:
        info = self.role_info(role)
        t = self._targets.get(role, {}).get(sample_id)
        if t is None:
            raise StoreError(f"sample {sample_id!r} has no {role} targets")
        want = list(info.layers) if layers is None else list(layers)
        missing = [l for l in want if l not in t.maps]
        if missing:
            raise StoreError(f"sample {sample_id!r}, role {role}: layers {missing} not stored (have {sorted(t.maps)})")
        for name in signals or {}:
            if getattr(t, name) is None:
                raise StoreError(f"sample {sample_id!r}, role {role}: no {name} targets")
        return replace(t, maps={l: t.maps[l] for l in want}, logits=t.logits if signals and "logits" in signals else None,
                       hidden=t.hidden if signals and "hidden" in signals else None)

    def read_input_ids(self, role: str, sample_id: str) -> torch.Tensor | None:
        t = self._held(role, sample_id)
        return None if t is None or t.input_ids is None else t.input_ids.long()

    def fingerprint(self, role: str, sample_id: str) -> str | None:
        t = self._held(role, sample_id)
        return None if t is None else t.fingerprint

    def content_digest(self, role: str, sample_ids: list[str]) -> str:
        """The samples' token fingerprints: memory has no checksums of stored values to digest.
        Raises StoreError for a sample not held (a run never trains on one)."""
        return hashlib.sha256(json.dumps([self.get(role, s, []).fingerprint for s in sample_ids]).encode()).hexdigest()
