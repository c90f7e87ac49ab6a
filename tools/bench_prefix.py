"""Prefix-shared vs unshared teacher pass, side by side in one run.

    .venv/bin/python tools/bench_prefix.py [--work DIR] [--groups 2] [--size 616x336]

Demo data with 1, 4 and 8 questions per six-camera group (tiny Qwen2.5-VL teacher, ~1650 prefix
tokens of ~1800), reasoning role (L-1 = 5 layers): build time and store bytes, shared vs
unshared. Then projects the real-scale store of a 28-layer teacher's reasoning role over 10k
samples at T ~ 1800 from the measured ratios.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click


def one(work: Path, q: int, groups: int, size, share: bool, encoding) -> dict:
    from drivekd.teacher.build import BuildConfig, build

    teacher = work / "models" / "qwen2_5_vl-teacher"
    data = work / f"data-q{q}" / "train.json"
    out = work / f"store-q{q}-{'shared' if share else 'plain'}-{encoding.mode}"
    shutil.rmtree(out, ignore_errors=True)
    res = build(BuildConfig(teachers={"reasoning": teacher}, data=data, images=None, out=out, progress=False, share_prefix=share, encoding=encoding))
    s = res["roles"]["reasoning"]
    return {"seconds": res["loop_seconds"], "n": s["complete"], "attn_bytes": s["attn_bytes"], "tril_bytes": s["tril_fp16_bytes"]}


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/drivekd-bench-prefix"))
@click.option("--groups", default=2, help="Six-camera groups per setting.")
@click.option("--size", default="616x336", help="Camera image size (616x336: ~264 tokens per camera on the tiny Qwen).")
def main(work: Path, groups: int, size: str) -> None:
    import torch

    from drivekd.data import load_samples
    from drivekd.demo.scenes import make_demo_data
    from drivekd.families import Family
    from drivekd.demo.tiny_models import make_tiny_models
    from drivekd.teacher.forward import common_prefix_length, image_groups
    from drivekd.store import Encoding

    torch.set_num_threads(1)  # see bench_cache.py: 2 OpenMP threads stall on this shared machine
    w, h = (int(x) for x in size.split("x"))
    if not (work / "models" / "qwen2_5_vl-teacher" / "config.json").is_file():
        make_tiny_models(work / "models", ["qwen2_5_vl"])
    fam = Family.from_pretrained(work / "models" / "qwen2_5_vl-teacher")
    rows = []
    for q in (1, 4, 8):
        make_demo_data(work / f"data-q{q}", groups=groups, six_view_fraction=1.0, questions_per_group=q, seed=11, size=(w, h))
        samples = load_samples(work / f"data-q{q}" / "train.json")
        lens = [fam.encode(s)[1].input_ids for s in samples]
        P = [common_prefix_length([lens[samples.index(s)] for s in g]) if len(g) > 1 else 0 for g in image_groups(samples)]
        plain = one(work, q, groups, (w, h), False, Encoding())
        shared = one(work, q, groups, (w, h), True, Encoding())
        rows.append((q, len(samples), min(x.numel() for x in lens), max(x.numel() for x in lens), max(P), plain, shared))
    print(f"\ntiny Qwen2.5-VL teacher, reasoning role (5 layers), {groups} six-camera groups per setting, lossless, 1 CPU thread\n")
    print(" q/group  samples   T range      prefix   build s/sample (plain / shared)  speed-up   store bytes (plain / shared)  smaller")
    for q, n, tmin, tmax, p, plain, shared in rows:
        sp = (plain["seconds"] / plain["n"]) / (shared["seconds"] / shared["n"])
        sm = plain["attn_bytes"] / shared["attn_bytes"]
        print(f" {q:7d}  {n:7d}  {tmin:5d}-{tmax:<5d}  {p:7d}   {plain['seconds'] / plain['n']:8.3f} / {shared['seconds'] / shared['n']:8.3f}"
              f"            {sp:6.2f}x   {plain['attn_bytes'] / 2**20:9.2f} / {shared['attn_bytes'] / 2**20:7.2f} MiB         {sm:5.2f}x")
    # Lossy at 8 questions per group, for the projection.
    q8 = rows[-1]
    lossy = one(work, 8, groups, (w, h), True, Encoding("lossy", keepbits=5))
    plain8, shared8 = q8[5], q8[6]
    lossless_ratio = plain8["tril_bytes"] / plain8["attn_bytes"]  # compression of unshared lower triangles
    share_ratio = plain8["attn_bytes"] / shared8["attn_bytes"]
    lossy_ratio = shared8["attn_bytes"] / lossy["attn_bytes"]
    raw = 27 * 10_000 * 1800 * 1801 / 2 * 2  # bytes: 27 reasoning layers x 10k samples, fp16 lower triangles
    print(f"\nprojection, reasoning role of a 28-layer teacher, 10k samples, T ~ 1800 (raw fp16 lower triangles {raw / 1e9:.0f} GB),")
    print(f"using the ratios measured at 8 questions per group (lossless {lossless_ratio:.2f}x, sharing {share_ratio:.2f}x, lossy keepbits=5 {lossy_ratio:.2f}x more):")
    print(f"   unshared lossless  {raw / lossless_ratio / 1e9:8.0f} GB")
    print(f"   shared   lossless  {raw / lossless_ratio / share_ratio / 1e9:8.0f} GB")
    print(f"   unshared lossy     {raw / lossless_ratio / lossy_ratio / 1e9:8.0f} GB")
    print(f"   shared   lossy     {raw / lossless_ratio / share_ratio / lossy_ratio / 1e9:8.0f} GB")
    print("   (real data averages fewer questions per group than 8; sharing saves less there, see the 1 and 4 rows)")


if __name__ == "__main__":
    main()
