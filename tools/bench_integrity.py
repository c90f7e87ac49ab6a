"""Read cost of checksummed targets (issue 11): the trainer's reader with every array checked
against its CRC32C, against today's reader (the schema-2 code path, copied below unchanged), on the
same store in one run.

A synthetic store of realistic size is written with the real writer: groups of questions sharing
an image prefix (P = 80% of T), `--layers` layers each (a reasoning role reads ~27). Rounds alternate
the two readers so that machine load hits both alike; the figure is the ratio of the median round
times (target <= 1.05).

    .venv/bin/python tools/bench_integrity.py [--T 1500] [--layers 8] [--groups 3] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from drivekd.store.integrity import checksum
from drivekd.store.targets import SampleTargets
from drivekd.store import Encoding, TeacherStore, decode_map


def causal_map(T: int, g: torch.Generator) -> torch.Tensor:
    s = torch.randn(T, T, generator=g) * 2
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1)


def write_store(path: Path, T: int, n_layers: int, groups: int, members: int = 2) -> list[str]:
    st = TeacherStore(path, mode="a")
    layers = list(range(n_layers))
    ids = [f"g{k}-q{j}" for k in range(groups) for j in range(members)]  # the role's sample list, as a build records it
    st.init_role("reasoning", {"family": "internvl", "teacher_path": "synthetic", "checkpoint_fingerprint": "x", "processor_fingerprint": "y",
                               "text_tokens": "paper", "num_teacher_layers": n_layers + 1, "encoding": Encoding().to_dict(),
                               "layers": layers, "role": "reasoning", "sample_ids": ids})
    g = torch.Generator().manual_seed(0)
    P = int(0.8 * T)
    for k in range(groups):
        full = [causal_map(T, g) for _ in layers]
        key = f"p-{k}"
        st.write_prefix("reasoning", key, torch.arange(P), [m[:P, :P] for m in full], layers, Encoding(), members)
        for j in range(members):
            sid = f"g{k}-q{j}"
            maps = [causal_map(T, g)[P:] for _ in layers]  # suffix rows (T - P, T)
            st.write_sample("reasoning", sid, torch.arange(T), torch.zeros(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool),
                            maps, layers, Encoding(), prefix=(key, P))
    return ids


def get_today(store: TeacherStore, role: str, sample_id: str) -> SampleTargets:
    """Today's (schema 2) TeacherStore.get, unchanged but for opening its groups through the store's
    public `sample_group` / `prefix_group` (the same zarr.open_group of the same local path): no
    checksum, no missing-chunk check."""
    info = store.role_info(role)
    status = store.sample_status(role, sample_id)
    assert status == "complete"
    want = list(info.layers)
    g = store.sample_group(role, sample_id)
    T = int(g.attrs["length"])
    attn = g["attn"]
    pattn = None
    if g.attrs.get("prefix"):
        key = g.attrs["prefix"]
        assert store.prefix_status(role, key) == "complete"
        pattn = store.prefix_group(role, key)["attn"]
    maps = {}
    for l in want:
        k = info.layers.index(l)
        packed = np.asarray(attn[k])
        if pattn is not None:
            packed = np.concatenate([np.asarray(pattn[k]), packed])
        maps[l] = decode_map(packed, T)
    return SampleTargets(sample_id, g.attrs["fingerprint"], torch.from_numpy(np.asarray(g["vision"][:])), torch.from_numpy(np.asarray(g["text"][:])), maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)  # shared machine: see README "Benchmarks"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        ids = write_store(path, a.T, a.layers, a.groups)
        print(f"store: {len(ids)} samples, T = {a.T} (prefix {int(0.8 * a.T)}), {a.layers} layers, written in {time.perf_counter() - t0:.1f} s")
        store = TeacherStore(path)
        for sid in ids:  # same values both ways (and warms the page cache)
            new, old = store.get("reasoning", sid), get_today(store, "reasoning", sid)
            assert all(torch.equal(new.maps[l], old.maps[l]) for l in old.maps)
        # Per sample, the two readers back to back in alternating order: load spikes of a shared
        # machine hit both alike. Measured as wall time and as this process's CPU time (all its
        # threads: zarr decodes on its own event-loop thread), which other jobs on the machine
        # barely disturb. Per reader: the median over rounds, summed over samples.
        clocks = {"wall": time.perf_counter, "cpu": time.process_time}
        times = {c: {"today": {sid: [] for sid in ids}, "checked": {sid: [] for sid in ids}} for c in clocks}
        for r in range(a.rounds):
            for i, sid in enumerate(ids):
                for name in (("today", "checked") if (r + i) % 2 == 0 else ("checked", "today")):
                    t = {c: f() for c, f in clocks.items()}
                    store.get("reasoning", sid) if name == "checked" else get_today(store, "reasoning", sid)
                    for c, f in clocks.items():
                        times[c][name][sid].append(f() - t[c])
        med = {c: {k: sum(statistics.median(v) for v in per.values()) for k, per in times[c].items()} for c in clocks}
        # The checksum pass alone, on one sample's packed rows (what the reader hashes).
        rows = [np.asarray(store.sample_group("reasoning", ids[0])["attn"][k]) for k in range(a.layers)]
        t = time.perf_counter()
        for _ in range(20):
            for row in rows:
                checksum(row)
        crc_ms = (time.perf_counter() - t) / 20 * 1e3
    for c in ("cpu", "wall"):
        per = {k: v / len(ids) * 1e3 for k, v in med[c].items()}
        print(f"{c:4s} time per sample read (median of {a.rounds} rounds): today {per['today']:.1f} ms, checked {per['checked']:.1f} ms; "
              f"ratio checked / today {med[c]['checked'] / med[c]['today']:.3f}x (target <= 1.05)")
    print(f"CRC32C of one sample's suffix rows alone: {crc_ms:.2f} ms")


if __name__ == "__main__":
    main()
