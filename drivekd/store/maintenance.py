"""Looking after a teacher store: what it holds (summary), whether it is sound (verify), and
removing what is damaged so the next build redoes it (repair). `drivekd-cache info/verify` call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivekd.errors import StoreError
from drivekd.ids import is_safe_key
from drivekd.store.integrity import nonfinite
from drivekd.store.reader import StoreReader
from drivekd.store.signals import ARRAYS as SIGNAL_ARRAYS


class StoreMaintenance(StoreReader):
    """Summary, verify and repair over a store's reader."""

    def summary(self, role: str) -> dict:
        """What a role holds: sample counts by status, bytes on disk and what compression and
        prefix sharing saved (`drivekd-cache info` prints it)."""
        meta = self.role_meta(role)
        counts = {"complete": 0, "skipped": 0, "incomplete": 0, "missing": 0}
        skipped = {}  # sample id -> the reason recorded with it
        for sid in meta.get("sample_ids", []):
            st = self.sample_status(role, sid)
            counts[st if st in counts else "incomplete"] += 1  # "writing": started, not finished
            if st == "skipped":
                skipped[sid] = self._mark(self._sample_dir(role, sid)).get("reason", "")
        b = self._bytes(role, len(meta["layers"]))
        groups, shared = len(b["prefix_use"]), sum(b["prefix_use"].values())
        return {
            "role": role,
            "schema_version": self.schema_version,
            "checksums": self.checksummed,
            "teacher": meta.get("teacher_path"),
            "checkpoint_fingerprint": meta.get("checkpoint_fingerprint", "")[:16],
            "family": meta.get("family"),
            "layers": meta.get("layers"),
            "encoding": meta.get("encoding"),
            **counts,
            "skipped_ids": list(skipped),
            "skipped_reasons": skipped,
            "orphans": self.orphans(role),
            "bytes_on_disk": self.backend.size(self.path / role),
            "attn_bytes": b["attn"],
            "fp16_square_bytes": b["raw"],
            "compression_ratio": (b["raw"] / b["attn"]) if b["attn"] else None,
            "prefix_groups": groups,
            "questions_per_group": (shared / groups) if groups else None,
            "unshared_samples": counts["complete"] - shared,
            # fp16 bytes of lower-triangle entries not stored thanks to sharing (before compression)
            "bytes_saved_by_sharing": b["saved_entries"] * 2,
            "tril_fp16_bytes": b["tril_entries"] * 2,
            "signals": meta.get("signals", {}),
            "signal_bytes": b["signals"],
        }

    def _bytes(self, role: str, nl: int) -> dict:
        """Byte accounting of a role's complete samples (nl stored layers each): attention bytes on
        disk (shared prefixes once), fp16 bytes of their square maps (`raw`), lower-triangle entries,
        entries not stored thanks to sharing, signal bytes by name, and members per prefix key."""
        raw = attn = tril_entries = 0
        signals: dict[str, int] = {}  # logits / hidden arrays on disk
        prefix_use: dict[str, int] = {}
        for d in self.backend.children(self.path / role / "samples"):
            zj = d / "zarr.json"
            if not self.backend.is_file(zj):
                continue
            attrs = self.backend.read_json(zj).get("attributes", {})
            if attrs.get("status") == "complete":
                T = int(attrs["length"])
                raw += nl * T * T * 2  # fp16 square maps
                tril_entries += nl * T * (T + 1) // 2  # what its full lower triangles would hold
                attn += self.backend.size(d / "attn")
                for name in attrs.get("signals", {}):
                    signals[name] = signals.get(name, 0) + sum(self.backend.size(d / k) for k in SIGNAL_ARRAYS.get(name, ()))
                if attrs.get("prefix"):
                    prefix_use[attrs["prefix"]] = prefix_use.get(attrs["prefix"], 0) + 1
        for key in prefix_use:
            attn += self.backend.size(self._prefix_dir(role, key) / "attn")
        saved = 0
        for d in self.backend.children(self.path / role / "prefixes"):
            zj = d / "zarr.json"
            if d.name in prefix_use and self.backend.is_file(zj):
                P = int(self.backend.read_json(zj)["attributes"]["length"])
                saved += nl * P * (P + 1) // 2 * (prefix_use[d.name] - 1)  # kept once, used n times
        return {"raw": raw, "attn": attn, "tril_entries": tril_entries, "saved_entries": saved, "signals": signals, "prefix_use": prefix_use}

    def sample_bytes(self, role: str, probe: int = 16) -> int | None:
        """Mean bytes on disk of a complete sample of `role` (a few probed; shared prefixes shared
        out over their members); None when none is complete yet."""
        sdir = self.path / role / "samples"
        sizes = []
        for d in self.backend.children(sdir):
            m = self._mark(d)
            if m.get("status") == "complete":
                b = self.backend.size(d)
                if m.get("prefix"):
                    pm = self._mark(self._prefix_dir(role, m["prefix"]))
                    b += self.backend.size(self._prefix_dir(role, m["prefix"])) // max(1, int(pm.get("members", 1)))
                sizes.append(b)
                if len(sizes) >= probe:
                    break
        return int(sum(sizes) / len(sizes)) if sizes else None

    def orphans(self, role: str) -> list[str]:
        """Samples on disk that the role's last build did not list (its data had them before it was
        made smaller): a run on the fuller data would still read them. Sorted by id."""
        expected = set(self.role_meta(role).get("sample_ids", []))
        # samples/zarr.json (the group's own metadata) and names no build could write are not samples.
        return sorted(d.name for d in self.backend.children(self.path / role / "samples")
                      if d.name not in expected and is_safe_key(d.name) and not self.backend.is_file(d))

    def verify(self, role: str, quick: bool = False) -> list["Problem"]:
        """Every sample on disk checked: those the last build listed must be complete (or skipped),
        orphans (`orphans`) must be sound if complete. Every file present and, unless `quick`,
        every array equal to the checksum written with it (shared prefixes included), finite, and
        its token fingerprint consistent. Returns the problems found (empty: the role is sound)."""
        bad_prefix: dict[str, str] = {}  # key -> problem, checked once however many members use it
        extra = list(self.role_meta(role).get("signals", {}))  # logits / hidden, every sample must carry them
        problems = [p for sid in self.role_meta(role).get("sample_ids", []) for p in self._verify_sample(role, sid, extra, quick, bad_prefix)]
        for sid in self.orphans(role):
            problems += [Problem(p.role, p.sample_id, p.message, p.prefix, orphan=True)
                         for p in self._verify_sample(role, sid, extra, quick, bad_prefix)]
        return problems

    def _verify_sample(self, role: str, sid: str, extra: list[str], quick: bool, bad_prefix: dict[str, str]) -> list["Problem"]:
        """verify's findings for one sample (bad_prefix: shared prefixes already checked)."""
        from drivekd.families.base import token_fingerprint

        st = self.sample_status(role, sid)
        if st == "skipped":
            return []
        if st != "complete":
            return [Problem(role, sid, st)]
        gone = self.missing_files(role, sid)
        if gone:
            return [Problem(role, sid, f"marked complete but {len(gone)} file(s) are missing, e.g. {gone[0]}")]
        sig_problem = self._verify_signals(role, sid, extra, quick)
        if sig_problem:
            return [Problem(role, sid, sig_problem)]
        if quick:
            return []
        problems = []
        try:
            ids = self.read_input_ids(role, sid)
            mark = self._mark(self._sample_dir(role, sid))
            key = mark.get("prefix")
            if key and key not in bad_prefix:
                bad_prefix[key] = self._verify_prefix(role, key)
            if key and bad_prefix[key]:
                return [Problem(role, sid, bad_prefix[key], prefix=key)]
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
            # A checksum proves the values are those written, not that they are numbers: a store
            # built before the writer refused NaN (or from a NaN teacher by another tool) has them.
            for l, m in t.maps.items():
                bad = nonfinite(m.numpy())
                if bad:
                    problems.append(Problem(role, sid, f"layer {l} attention is not finite ({bad}); --repair removes it, "
                                                       "and the next build stores it or names the teacher's fault"))
                    break
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
                    sig = self._read_signal(role, sid, d, self._group(d), self._mark(d), name, None)
                except StoreError as e:
                    return f"{name} unreadable ({e})"
                # (name, array, -inf allowed): a log-probability may be log 0, a hidden state may not
                arrays = ([("log-probabilities", sig.logprobs, True), ("tail", sig.log_tail, True)] if name == "logits"
                          else [(f"layer {l}", h, False) for l, h in sig.layers.items()])
                for what, a, neg_inf in arrays:
                    bad = nonfinite(a.numpy(), allow_neg_inf=neg_inf)
                    if bad:
                        return f"{name} {what} not finite ({bad})"
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

    def repair(self, problems: list["Problem"], drop_orphans: list[str] = ()) -> list[Path]:
        """Delete the damaged sample and prefix groups that `verify` found, so that the next build
        rebuilds them (a sample whose prefix is gone is not done), and the roles' orphans named in
        `drop_orphans` (sound or not). The caller holds the role locks."""
        removed = []
        dirs = [d for p in problems for d in ([self._prefix_dir(p.role, p.prefix)] if p.prefix else []) + [self._sample_dir(p.role, p.sample_id)]]
        dirs += [self._sample_dir(r, sid) for r in drop_orphans for sid in self.orphans(r)]
        for d in dirs:
            if self.backend.exists(d):
                self.backend.delete(d)
                removed.append(d)
        return removed


@dataclass(frozen=True)
class Problem:
    """One finding of `TeacherStore.verify`: a sample (and, if the damage is there, its shared prefix)."""

    role: str
    sample_id: str
    message: str
    prefix: str | None = None
    orphan: bool = False  # on disk, not in the last build's data

    def __str__(self) -> str:
        return f"{self.role}/{self.sample_id}{' (orphan: not in the last build data)' if self.orphan else ''}: {self.message}"

    def __contains__(self, text: str) -> bool:  # reads like the message strings verify used to return
        return text in str(self)
