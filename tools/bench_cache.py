"""Benchmark of the teacher pass (drivekd-cache build), side by side in one run, as ratios.

    .venv/bin/python tools/bench_cache.py [--work DIR] [--groups 4] [--size 672x384]

On the tiny Qwen2.5-VL teacher with six-camera samples (T ~ 1100-2000 tokens):
 1. build time per sample vs a plain sdpa forward of the same teacher on the same inputs, for a
    single-layer role (planning) and the reasoning role (L-1 layers);
 2. vs the reference approach (eager attention, output_attentions=True, all layers): time and
    peak memory;
 3. bytes per sample per layer vs an fp16 square T x T map, lossless and lossy, and the change of
    the distillation losses (t2v MSE at L-2, full MSE over the reasoning layers) when targets come
    from the lossy store;
 4. read throughput (samples/s) of the reasoning role through a DataLoader with 0, 1, 2 workers.

Each timed case runs in its own process (fresh peak-RSS counter), one after the other.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
KEEPBITS = (7, 6, 5, 4)


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_case(case: str, work: Path) -> dict:
    """One timed case, in this (fresh) process."""
    import torch

    from drivekd.data import load_samples
    from drivekd.families import Family, load_model
    from drivekd.teacher.build import BuildConfig, build

    # One thread: on this shared 2-core machine two OpenMP threads stall (~20x) whenever another
    # process holds a core, which would swamp every ratio.
    torch.set_num_threads(1)
    teacher = work / "models" / "qwen2_5_vl-teacher"
    data = work / "data" / "train.json"
    samples = load_samples(data)
    fam = Family.from_pretrained(teacher)
    if case.startswith("build-"):
        role = case.split("-", 1)[1]
        out = work / f"store-{role}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        base = _rss_gb()
        # Unshared: this measures capture + store against the same forwards; bench_prefix.py
        # measures what prefix sharing saves on top.
        res = build(BuildConfig(teachers={role: teacher}, data=data, images=None, out=out, progress=False, share_prefix=False))
        return {"case": case, "seconds": res["loop_seconds"], "n": len(samples), "extra_peak_gb": _peak_gb() - base}
    model = load_model(teacher, capture=False, attn="eager" if case == "reference" else "sdpa").eval()
    base = _rss_gb()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in samples:
            inputs = fam.build_inputs([s])
            if case == "reference":
                out = model(**inputs.tensors, output_attentions=True)
                assert len(out.attentions) == len(model.model.language_model.layers)
            else:
                model(**inputs.tensors)
    return {"case": case, "seconds": time.perf_counter() - t0, "n": len(samples), "extra_peak_gb": _peak_gb() - base}


def setup(work: Path, groups: int, questions: int, size: tuple[int, int]) -> None:
    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models

    if not (work / "models" / "qwen2_5_vl-teacher" / "config.json").is_file():
        make_tiny_models(work / "models", ["qwen2_5_vl"])
    make_demo_data(work / "data", groups=groups, six_view_fraction=1.0, questions_per_group=questions, seed=7, size=size)


def loss_change(work: Path) -> dict:
    """Distillation losses with lossless vs lossy targets, same student maps."""
    import torch

    from drivekd.data import load_samples
    from drivekd.families import Family, capture_attention, load_model
    from drivekd.losses.attention import full_attention_mse, t2v_mse
    from drivekd.teacher.build import BuildConfig, build
    from drivekd.store import Encoding, TeacherStore

    teacher = work / "models" / "qwen2_5_vl-teacher"
    data = work / "data" / "train.json"
    out = {}
    lossless = TeacherStore(work / "store-reasoning")
    T_info = lossless.summary("reasoning")
    out["lossless"] = {"bytes_per_layer": T_info["attn_bytes"] / (len(T_info["layers"]) * T_info["complete"]),
                       "fp16_square_per_layer": T_info["fp16_square_bytes"] / (len(T_info["layers"]) * T_info["complete"])}
    student = load_model(work / "models" / "qwen2_5_vl-student").eval()
    fam = Family.from_pretrained(work / "models" / "qwen2_5_vl-student")
    samples = load_samples(data)
    layers = list(lossless.role_info("reasoning").layers)
    s_maps = []
    with torch.no_grad():
        for s in samples:
            inputs = fam.build_inputs([s])
            with capture_attention(student, [0, 1, 2]) as maps:
                student(**inputs.tensors)
            s_maps.append((inputs.layouts[0], {k: v[0] for k, v in maps.items()}))

    def losses(store, proxy=False):
        """Mean t2v MSE (teacher L-2) and full MSE (3 layers) against the student's maps.

        The tiny random student and teacher both attend almost uniformly, so their gap is about
        as small as the quantisation error: a worst case. proxy=True stands in a realistic gap,
        using the lossless teacher's neighbouring layer as the "student" map.
        """
        t2v, full = [], []
        for s, (lay, sm) in zip(samples, s_maps):
            t = store.get("reasoning", s.id)
            if proxy:
                ref = lossless.get("reasoning", s.id)
                sm = {0: ref.maps[layers[1]], 1: ref.maps[layers[2]], 2: ref.maps[layers[0]]}
            valid = torch.ones(1, lay.length, dtype=torch.bool)
            t2v.append(t2v_mse(sm[2][None], t.maps[layers[-1]][None], lay.text[None], lay.vision[None]).item())
            full.append(sum(full_attention_mse(sm[i][None], t.maps[layers[i]][None], valid).item() for i in range(3)))
        return sum(t2v) / len(t2v), sum(full) / len(full)

    ref_t2v, ref_full = losses(lossless)
    px_t2v, px_full = losses(lossless, proxy=True)
    for keep in KEEPBITS:
        st_dir = work / f"store-lossy{keep}"
        import shutil

        shutil.rmtree(st_dir, ignore_errors=True)
        build(BuildConfig(teachers={"reasoning": teacher}, data=data, images=None, out=st_dir, encoding=Encoding("lossy", keepbits=keep),
                          progress=False, share_prefix=False))
        st = TeacherStore(st_dir)
        info = st.summary("reasoning")
        l_t2v, l_full = losses(st)
        q_t2v, q_full = losses(st, proxy=True)
        out[f"lossy{keep}"] = {
            "bytes_per_layer": info["attn_bytes"] / (len(info["layers"]) * info["complete"]),
            "t2v_change": abs(l_t2v - ref_t2v) / ref_t2v,
            "full_change": abs(l_full - ref_full) / ref_full,
            "proxy_t2v_change": abs(q_t2v - px_t2v) / px_t2v,
            "proxy_full_change": abs(q_full - px_full) / px_full,
        }
    return out


def read_throughput(work: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from drivekd.store import TeacherStore

    class Targets(Dataset):
        def __init__(self, path):
            self.path = path
            self.ids = TeacherStore(path).role_meta("reasoning")["sample_ids"]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            t = TeacherStore(self.path).get("reasoning", self.ids[i])
            return torch.stack(list(t.maps.values())).shape[-1]

    ds = Targets(work / "store-reasoning")
    res = {}
    for workers in (0, 1, 2):
        dl = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False)
        t0 = time.perf_counter()
        n = 0
        for _ in range(3):
            for _ in dl:
                n += 1
        res[workers] = n / (time.perf_counter() - t0)
    return res


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/drivekd-bench-cache"))
@click.option("--groups", default=4, help="Six-camera groups.")
@click.option("--questions", default=2, help="Questions per group.")
@click.option("--size", default="616x336", help="Camera image size; 616x336 gives ~1700 tokens per six-view sample on the tiny Qwen.")
@click.option("--case", default=None, hidden=True)
def main(work: Path, groups: int, questions: int, size: str, case: str | None) -> None:
    if case:
        print(json.dumps(run_case(case, work)))
        return
    import torch

    torch.set_num_threads(1)
    w, h = (int(x) for x in size.split("x"))
    setup(work, groups, questions, (w, h))
    cases = {}
    for c in ("plain-sdpa", "build-planning", "build-reasoning", "reference"):
        p = subprocess.run([sys.executable, __file__, "--work", str(work), "--case", c], capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(p.stderr)
        cases[c] = json.loads(p.stdout.strip().splitlines()[-1])
    from drivekd.data import load_samples
    from drivekd.families import Family

    fam = Family.from_pretrained(work / "models" / "qwen2_5_vl-teacher")
    Ts = [fam.encode(s)[1].length for s in load_samples(work / "data" / "train.json")]
    per = {c: v["seconds"] / v["n"] for c, v in cases.items()}
    print(f"\ntiny Qwen2.5-VL teacher (6 layers), {len(Ts)} six-camera samples, T = {min(Ts)}..{max(Ts)} tokens, 1 CPU thread\n")
    print("1-2. teacher pass, per sample            s/sample   vs sdpa   extra peak RSS")
    for c in ("plain-sdpa", "build-planning", "build-reasoning", "reference"):
        print(f"   {c:<36} {per[c]:8.3f}   {per[c] / per['plain-sdpa']:6.2f}x   {cases[c]['extra_peak_gb']:.2f} GB")
    print(f"   build-planning vs reference: {per['reference'] / per['build-planning']:.2f}x faster, "
          f"build-reasoning vs reference: {per['reference'] / per['build-reasoning']:.2f}x faster")
    lc = loss_change(work)
    sq = lc["lossless"]["fp16_square_per_layer"]
    print("\n3. bytes per sample per layer               bytes     vs fp16 TxT   loss change t2v / full: tiny student | neighbour-layer proxy")
    print(f"   fp16 square map                    {sq:12.0f}        1.00x")
    print(f"   lossless (tril, zstd-1+shuffle)   {lc['lossless']['bytes_per_layer']:12.0f}   {sq / lc['lossless']['bytes_per_layer']:9.2f}x   0 (exact fp16)")
    for keep in KEEPBITS:
        d = lc[f"lossy{keep}"]
        print(f"   lossy keepbits={keep}                  {d['bytes_per_layer']:12.0f}   {sq / d['bytes_per_layer']:9.2f}x   "
              f"{100 * d['t2v_change']:.3f}% / {100 * d['full_change']:.3f}%  |  {100 * d['proxy_t2v_change']:.3f}% / {100 * d['proxy_full_change']:.3f}%")
    rt = read_throughput(work)
    print("\n4. reading the reasoning role (all layers) through a DataLoader")
    for k, v in rt.items():
        print(f"   num_workers={k}: {v:7.1f} samples/s")


if __name__ == "__main__":
    main()
