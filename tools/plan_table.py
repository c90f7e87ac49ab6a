"""Issue 18's table: planned peak memory by category and FLOPs ratio to SFT, six cameras, micro-batch 1.

    PYTHONPATH=. .venv/bin/python tools/plan_table.py [--out plan_table.json] [--models InternVL3-1B-hf ...]

Students InternVL3-1B (teacher InternVL3-8B) and Qwen2.5-VL-3B (teacher Qwen2.5-VL-7B), from
configs/models/, at the six-camera image settings (InternVL: no tiling, 256 tokens per camera;
Qwen2.5-VL: max_pixels 200704, 231 per camera); rows: SFT,
multi + none, multi + AGP, each with and without gradient checkpointing, the per-loss rows in fp32
and bf16 (SFT has no rows); and the teacher pass (bf16 weights, all three roles' layers captured)
against a plain sdpa forward. Everything runs on fake tensors (drivekd-train --dry-run's code).

    PYTHONPATH=. .venv/bin/python tools/plan_table.py --teacher-parallel [--out plan_table_tp.json]

Issue 27's table instead: the per-rank peak of the 14B / 38B-class teacher passes (InternVL3-14B,
InternVL3-38B; all three roles' layers captured, bf16, six cameras without tiling) over 1, 2, 4
and 8 tensor-parallel ranks (`drivekd-cache build --dry-run --teacher-parallel tp --nproc N`'s code).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
PAIRS = {"InternVL3-1B-hf": "InternVL3-8B-hf", "Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-7B-Instruct"}
TP_TEACHERS = ["InternVL3-14B-hf", "InternVL3-38B-hf"]
TP_SIZES = [1, 2, 4, 8]


def teacher_parallel_table(configs: Path, out: Path, teachers: list[str]) -> None:
    from drivekd.images import ImageSettings
    from drivekd.planner import plan as P
    from drivekd.planner.teacher_parallel import count_rank

    GiB = 1 << 30
    results = {}
    for name in teachers:
        ckpt = configs / name
        family, L = P.model_depth(ckpt, "--model")
        shapes = P.shapes_for(family, P.student_config(ckpt), ckpt, 6, None, ImageSettings(tiling=False), "--model")
        layers = sorted({0, L - 2, *range(0, L - 1)})  # perception 0, reasoning 0..L-2, planning L-2
        rows = []
        for n in TP_SIZES:
            t0 = time.process_time()
            r = count_rank(ckpt, layers, shapes, n)
            peak = r["tracked_peak_bytes"]
            cats = {**r["categories"], "allocator_margin": P.margin_bytes(peak)}
            row = {"tp": n, "peak_gib": round((peak + P.margin_bytes(peak)) / GiB, 2), "params_per_rank_b": round(r["params"] / 1e9, 2),
                   "categories_gib": {k: round(v / GiB, 2) for k, v in cats.items()}, "tflops_per_rank": round(r["flops"] / 1e12, 2),
                   "cpu_s": round(time.process_time() - t0, 1)}
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        results[name] = {"seq_len": shapes.seq_len, "layers_captured": len(layers), "rows": rows}
        out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="plan_table.json")
    ap.add_argument("--models", nargs="*", default=list(PAIRS))
    ap.add_argument("--configs", default=str(CONFIGS), help="folder of the models' config folders")
    ap.add_argument("--teacher-parallel", action="store_true", help="the per-rank teacher table (TP_TEACHERS x TP_SIZES) instead")
    args = ap.parse_args()
    if args.teacher_parallel:
        teachers = [m for m in args.models if m in TP_TEACHERS] or TP_TEACHERS
        teacher_parallel_table(Path(args.configs), Path(args.out), teachers)
        return
    from drivekd.images import ImageSettings
    from drivekd.planner import plan as P
    from drivekd.trainer.settings import TrainConfig

    six_cameras = {"internvl": ImageSettings(tiling=False), "qwen2_5_vl": ImageSettings(max_pixels=200704)}

    GiB = 1 << 30
    results = {}
    for name in args.models:
        student, teacher = Path(args.configs) / name, Path(args.configs) / PAIRS[name]
        family, L = P.model_depth(student)
        images = six_cameras[family]
        config = P.student_config(student)
        shapes = P.shapes_for(family, config, student, 6, None, images)
        base = TrainConfig(student=student, recipe="multi", dtype="bfloat16", image_settings=images)
        rows = []
        variants = [("SFT", P.sft_config(base), ["float32"])] + [
            (f"multi+{proj}", replace(base, projection=proj), ["float32", "bfloat16"]) for proj in ("none", "agp")]
        sft_flops = {}
        for label, cfg, dtypes in variants:
            for gc in (False, True):
                for rd in dtypes:
                    c = replace(cfg, gradient_checkpointing=gc, grad_buffer_dtype=rd)
                    t0 = time.process_time()
                    n = P.count_step(c, P.dry_plan(c, L, family), shapes, config)
                    if label == "SFT":
                        sft_flops[gc] = n.flops
                    cats = {**n.categories, "allocator_margin": P.margin_bytes(n.peak)}
                    row = {"run": label, "gradient_checkpointing": gc, "grad_rows": rd if label != "SFT" else "-",
                           "peak_gib": round(sum(cats.values()) / GiB, 2),
                           "categories_gib": {k: round(v / GiB, 2) for k, v in cats.items()},
                           "flops_ratio_to_sft": round(n.flops / sft_flops[gc], 2), "tflops": round(n.flops / 1e12, 2),
                           "cpu_s": round(time.process_time() - t0, 1)}
                    rows.append(row)
                    print(name, json.dumps(row), flush=True)
        tfamily, TL = P.model_depth(teacher, "--model")
        tshapes = P.shapes_for(tfamily, P.student_config(teacher), teacher, 6, shapes.seq_len, images, "--model")
        layers = sorted({0, TL - 2, *range(0, TL - 1)})  # perception 0, reasoning 0..L-2, planning L-2
        tp = {}
        for label, lay in (("capture", layers), ("plain_sdpa", None)):
            n = P.count_teacher_pass(teacher, lay, tshapes)
            tp[label] = {"peak_gib": round(n.peak / GiB, 2), "categories_gib": {k: round(v / GiB, 2) for k, v in n.categories.items()},
                         "tflops": round(n.flops / 1e12, 2)}
            print(PAIRS[name], label, json.dumps(tp[label]), flush=True)
        results[name] = {"seq_len": shapes.seq_len, "tokens_per_camera": shapes.tokens_per_camera, "rows": rows,
                         "teacher": {"name": PAIRS[name], **tp}}
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
