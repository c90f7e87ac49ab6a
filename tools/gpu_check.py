"""GPU check: the dry run's planned memory against CUDA's measurement, for the shipped students.

    PYTHONPATH=. python tools/gpu_check.py [--out DIR] [--models NAME ...] [--variants NAME ...]
                                           [--steps 3] [--budget-s 480] [--jobs N] [--tiny]

For each student config in configs/models (InternVL3-1B-hf, InternVL3-2B-hf, Qwen2.5-VL-3B-Instruct;
the 8B / 7B folders are the teachers) it builds the student with RANDOM weights on the GPU (no
download) and, for each variant below, runs `--steps` real optimizer steps of drivekd's step code
(drivekd.trainer.step.TrainStep: capture, losses, per-loss gradients, projection, AdamW) on the
planner's synthetic six-camera sample (text, camera image tokens, a 200-token answer, one teacher
attention target per student loss layer), at the image settings of the README's "Image settings"
(InternVL: one 448-px tile per camera; Qwen2.5-VL: max_pixels 200704). Beside it, the dry run
(drivekd-train --dry-run's `dry_run`, fake tensors, in worker processes while the GPU works) plans
the same run. Step 1 allocates the optimizer state; CUDA's peak counter is reset after it, so the
measured peak is a steady-state step's, as the plan counts it.

Variants (names for --variants; T = cameras x tokens per camera + 264 text tokens):

    sft-T6          CE only (one backward), six cameras
    agp-rows-T3     multi + AGP, K gradient rows, three cameras (a shorter T)
    agp-rows-T6     multi + AGP, K gradient rows, six cameras
    agp-gram-T6     multi + AGP, Gram engine, six cameras
    kahan-T6        multi + AGP, Gram engine, --precision bf16-kahan
    offload-T6      multi + AGP, Gram engine, --precision bf16-offload (fp32 masters + AdamW on the host)
    lora-T6         multi + AGP, --lora (rank 16, the family's default targets), engine auto

A variant that runs out of GPU memory is reported as OOM (with the plan beside it) and the check
goes on. After --budget-s seconds (default 480: the whole check fits ~8 minutes on one H200) no new
variant starts; the rest are reported as skipped. Last, it checks that a student's processor saved
as drivekd saves final/ (drivekd.families.processors.save_processor) comes back through
`AutoProcessor.from_pretrained` with image pixels (needs torchvision, as GPU machines have).

Where CUDA is present it also runs a one-GPU FSDP smoke run (`fsdp_smoke`): `torchrun
--nproc_per_node 1` of drivekd-train --fsdp (multi + AGP, 2 steps) on the tiny InternVL student with
online tiny-teacher targets, beside the same run without --fsdp; gpu_check.json's "fsdp_smoke"
holds its status and the largest weight difference of the two final/ folders.

Without CUDA (or with --tiny) it runs the same table on drivekd's tiny students on the CPU (memory
columns n/a): tests/test_gpu_check.py runs it that way.

Output (in --out, default gpu_check/): gpu_check.json, a list of rows, one per model x variant:

    model, variant, status ("ok" | "OOM" | "skipped (budget)" | "error: ..."), device,
    cameras, tokens_per_camera, seq_len, recipe, engine, precision, lora,
    planned_tracked_gib   the dry run's counted peak (tracked_peak_bytes, no allocator margin)
    planned_peak_gib      the same plus the allocator margin (peak_bytes: the "fits" figure)
    measured_gib          torch.cuda.max_memory_allocated over the timed steps (null on CPU)
    reserved_gib          torch.cuda.max_memory_reserved (null on CPU)
    ratio                 measured_gib / planned_tracked_gib
    step_s                median wall time of the timed optimizer steps (synchronised)
    planned_tflop         the dry run's FLOPs of one step; achieved_tflops = planned_tflop / step_s
    plan_s, measure_s     seconds each side took

plus `autoprocessor` (per family: "ok", or why not) and the environment (GPU, torch,
transformers, drivekd); gpu_check.md holds the same as a markdown table (printed too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
STUDENTS = ("InternVL3-1B-hf", "Qwen2.5-VL-3B-Instruct", "InternVL3-2B-hf")
GiB = 1 << 30
PLAN_GRACE_S = 120  # plans may finish this long after the budget before they are given up
# (name, TrainConfig changes, cameras)
VARIANTS = {
    "sft-T6": ({"recipe": "sft", "dynamic_weights": False}, 6),
    "agp-rows-T3": ({"projection": "agp", "grad_engine": "rows"}, 3),
    "agp-rows-T6": ({"projection": "agp", "grad_engine": "rows"}, 6),
    "agp-gram-T6": ({"projection": "agp", "grad_engine": "gram"}, 6),
    "kahan-T6": ({"projection": "agp", "grad_engine": "gram", "precision": "bf16-kahan", "dtype": "auto"}, 6),
    "offload-T6": ({"projection": "agp", "grad_engine": "gram", "precision": "bf16-offload", "dtype": "auto"}, 6),
    "lora-T6": ({"projection": "agp", "lora": True}, 6),
}


def six_camera_settings(family: str, tiny: bool = False):
    """The README's six-camera image settings (its "Image settings" section); for the tiny students,
    as few tokens (InternVL: one 16-token tile; Qwen2.5-VL: at most 16 tokens per camera)."""
    from drivekd.images import ImageSettings

    qwen = 28 * 28 * 16 if tiny else 200704
    return {"internvl": ImageSettings(tiling=False), "qwen2_5_vl": ImageSettings(max_pixels=qwen)}[family]


def run_config(student: Path, family: str, changes: dict, tiny: bool):
    from drivekd.trainer.settings import TrainConfig

    base = dict(student=student, recipe="multi", lr=1e-5, max_grad_norm=1.0, image_settings=six_camera_settings(family, tiny))
    return TrainConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- the plan (worker processes)


def _init_worker() -> None:
    torch.set_num_threads(1)


def plan_one(cfg, cameras: int, gpu_memory: int | None) -> dict:
    from drivekd.planner.plan import dry_run

    t0 = time.perf_counter()
    r = dry_run(cfg, cameras=cameras, gpu_memory=gpu_memory, suggest=False)
    return {"planned_tracked_gib": r["tracked_peak_bytes"] / GiB, "planned_peak_gib": r["peak_bytes"] / GiB,
            "planned_tflop": r["flops"] / 1e12, "planned_engine": r["grad_engine"], "seq_len": r["seq_len"],
            "tokens_per_camera": r["tokens_per_camera"], "plan_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the measurement


def measure_one(cfg, cameras: int, device: torch.device, steps: int, gpu_memory: int | None) -> dict:
    """`steps` real optimizer steps of the run `cfg` on random weights; the last steps - 1 are timed."""
    from drivekd.planner import plan as P
    from drivekd.trainer.loop import Dist, autocast_dtype, prepare_student
    from drivekd.trainer.step import AssumeFinite, TrainStep
    from drivekd.optim.precision import param_dtype

    t0 = time.perf_counter()
    family, L = P.model_depth(Path(cfg.student))
    config = P.student_config(cfg.student)
    shapes = P.shapes_for(family, config, Path(cfg.student), cameras, None, cfg.image_settings)
    plan = P.dry_plan(cfg, L, family)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):  # random init on the device: seconds, not minutes, at 3B
        model = P.build_student(cfg.student, family, config, param_dtype(cfg.precision))
    model = prepare_student(model, cfg)
    ts = TrainStep(model, plan, Dist(str(device)), autocast_dtype(cfg, device), AssumeFinite(), device_memory=gpu_memory)
    batch = P.synthetic_batch(shapes, config, plan)
    batch.inputs.to(device)
    T = shapes.seq_len
    # A causal, row-normalised attention map per student loss layer: (1, T, T) fp32, as a store delivers.
    causal = torch.tril(torch.ones(T, T, device=device))
    causal = (causal / causal.sum(-1, keepdim=True))[None]
    batch.targets = {r: {s: causal for s in d} for r, d in batch.targets.items()}
    times = []
    for i in range(steps):
        if cuda and i == 1:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)  # step 0 allocated the optimizer state
        t = time.perf_counter()
        ts.micro_step(batch, list(plan.static_weights), list(range(1, len(plan.row_names))), where=f"gpu check step {i + 1}")
        ts.average(1)
        ts.clip()
        ts.optimizer_step()
        ts.zero_grad()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    out = {"engine": ts.engine or "none", "seq_len": T, "tokens_per_camera": shapes.tokens_per_camera,
           "step_s": statistics.median(times[1:] or times),
           "measured_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None}
    del ts, model, batch, causal
    if cuda:
        torch.cuda.empty_cache()
    out["measure_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- AutoProcessor on final/-style files


def autoprocessor_check(students: dict[str, Path], work: Path) -> dict[str, str]:
    """Each family's processor saved as drivekd saves final/, loaded back with AutoProcessor: it must
    give pixel values and the same tokens as drivekd's processor."""
    from PIL import Image

    from drivekd.families import Family
    from drivekd.families.processors import save_processor

    out = {}
    image = Image.new("RGB", (320, 180), (40, 120, 200))
    for family, folder in students.items():
        try:
            from transformers import AutoProcessor

            ours = Family.from_pretrained(folder).processor
            save_processor(ours, work / f"processor-{family}")
            theirs = AutoProcessor.from_pretrained(work / f"processor-{family}")
        except Exception as e:  # noqa: BLE001 - reported, e.g. "no torchvision" on CPU machines
            out[family] = f"skipped: AutoProcessor cannot build it here ({_why(e)[:90]})"
            continue
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "ahead?"}]}]
        kw = dict(tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
        a, b = theirs.apply_chat_template(msgs, **kw), ours.apply_chat_template(msgs, **kw)
        if "pixel_values" not in a:
            out[family] = f"FAIL: {type(theirs).__name__} gave no pixel_values"
        elif not torch.equal(a["input_ids"], b["input_ids"]):
            out[family] = f"FAIL: {type(theirs).__name__} gives other tokens than drivekd's processor"
        else:
            out[family] = f"ok ({type(theirs).__name__}, {type(theirs.image_processor).__name__})"
    return out


# ----------------------------------------------------------------------------- the table


COLUMNS = ("model", "variant", "status", "seq_len", "engine", "planned_tracked_gib", "planned_peak_gib", "measured_gib",
           "reserved_gib", "ratio", "step_s", "achieved_tflops")


def _cell(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], env: dict, autoproc: dict) -> str:
    lines = [f"GPU check: {env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, drivekd {env['drivekd']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "AutoProcessor on drivekd-saved processor files: " + "; ".join(f"{k}: {v}" for k, v in autoproc.items())]
    return "\n".join(lines) + "\n"


def tiny_students(work: Path) -> dict[str, Path]:
    from drivekd.demo.tiny_models import BUILDERS

    return {fam: BUILDERS[fam](work / f"{fam}-student", "student", seed=1001) for fam in BUILDERS}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--models", nargs="*", default=None, help=f"config folders under configs/models (default: {', '.join(STUDENTS)})")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per variant (the first allocates the optimizer state; the rest are timed)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no new variant starts after this many seconds")
    ap.add_argument("--jobs", type=int, default=None, help="dry-run worker processes (default: CPUs / 2, at most 8)")
    ap.add_argument("--tiny", action="store_true", help="drivekd's tiny students on the CPU (the default without CUDA)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu") if tiny else torch.device("cuda")
    gpu_memory = None if tiny else torch.cuda.get_device_properties(device).total_memory
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows, env, autoproc = _check(args, Path(tmp), tiny, device, gpu_memory, start)
    (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows, "autoprocessor": autoproc}, indent=2) + "\n")
    text = markdown(rows, env, autoproc)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return rows


def _check(args, work: Path, tiny: bool, device: torch.device, gpu_memory: int | None, start: float):
    from drivekd.families.base import detect_family

    tinies = tiny_students(work)
    if tiny:
        students = {f"tiny-{fam}": p for fam, p in tinies.items()}
        if args.models:
            students = {k: v for k, v in students.items() if any(m in k for m in args.models)}
    else:
        students = {m: CONFIGS / m for m in (args.models or STUDENTS)}
    jobs = [(m, v) for m in students for v in args.variants]
    cfgs = {(m, v): (run_config(students[m], detect_family(students[m]), VARIANTS[v][0], tiny), VARIANTS[v][1]) for m, v in jobs}

    n_workers = args.jobs or max(1, min(8, (os.cpu_count() or 2) // 2))
    rows = []
    # The plans run in worker processes (fake tensors, CPU) while this process drives the GPU;
    # terminate() at the end stops any plan still running past the budget.
    pool = mp.get_context("spawn").Pool(n_workers, initializer=_init_worker)
    try:
        plans = {k: pool.apply_async(plan_one, (c, cams, gpu_memory)) for k, (c, cams) in cfgs.items()}
        for m, v in jobs:
            cfg, cams = cfgs[(m, v)]
            row = {"model": m, "variant": v, "device": str(device), "cameras": cams, "recipe": cfg.recipe,
                   "precision": cfg.precision, "lora": cfg.lora}
            if time.perf_counter() - start > args.budget_s:
                row["status"] = "skipped (budget)"
            else:
                row.update(_measured(cfg, cams, device, args.steps, gpu_memory))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows:
            wait = max(1.0, args.budget_s + PLAN_GRACE_S - (time.perf_counter() - start))
            try:
                p = plans[(row["model"], row["variant"])].get(timeout=wait)
            except mp.TimeoutError:
                row["plan_error"] = "not finished within the budget"
                continue
            except Exception as e:  # noqa: BLE001 - one row says what broke; the check goes on
                row["plan_error"] = _why(e)
                continue
            _compare(row, p)
    finally:
        pool.terminate()
        pool.join()

    import transformers

    import drivekd

    env = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny students)",
           "torch": torch.__version__, "transformers": transformers.__version__, "drivekd": drivekd.__version__,
           "wall_s": round(time.perf_counter() - start, 1)}
    if device.type == "cuda":
        env["fsdp_smoke"] = fsdp_smoke(work)
    return rows, env, autoprocessor_check(tinies, work)


FSDP_LAYERS = {"perception": [0], "reasoning": [0, 1, 2, 3, 4], "planning": [4]}  # the tiny teacher's 6 layers


def fsdp_worker(root: Path, out: Path, fsdp: bool, device: str = "cuda") -> None:
    """One tiny multi + AGP run on the GPU (under torchrun when `fsdp`)."""
    from drivekd.data.loaders import load_samples
    from drivekd.teacher.online import compute_targets
    from drivekd.trainer.loop import train
    from drivekd.trainer.settings import TrainConfig

    data, images = root / "demo" / "train.json", root / "demo"
    targets = compute_targets(root / "tiny" / "internvl-teacher", load_samples(data, images), FSDP_LAYERS)
    train(TrainConfig(student=root / "tiny" / "internvl-student", data=data, images=images, out=out, num_workers=0,
                      progress=False, grad_accum=2, max_steps=2, save_every=1, report_to="none", device=device, fsdp=fsdp,
                      lr=1e-3), targets)


def fsdp_smoke(work: Path, device: str = "cuda") -> dict:
    """--fsdp on one GPU (torchrun, one rank) against the same run without it: status and the largest
    difference of the final weights (bf16 autocast: expect ~1e-3 at most, from reduction order)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models

    root = work / "fsdp"
    make_tiny_models(root / "tiny")
    make_demo_data(root / "demo", groups=2, questions_per_group=2, seed=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {"plain": [sys.executable, __file__, "--fsdp-worker", str(root), str(root / "plain"), "0", device],
            "fsdp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
                     "--fsdp-worker", str(root), str(root / "fsdp"), "1", device]}
    for name, cmd in runs.items():
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            return {"status": f"error ({name}): {(p.stderr or p.stdout).strip().splitlines()[-1][:300]}"}
    a, b = (load_file(str(root / n / "final" / "model.safetensors")) for n in ("plain", "fsdp"))
    if a.keys() != b.keys():
        return {"status": f"error: final/ tensors differ: {sorted(set(a) ^ set(b))[:5]}"}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"status": "ok", "max_weight_diff": diff, "sharded_step_checkpoint": (root / "fsdp" / "step-000001" / "sharded").is_dir()}


def _why(e: Exception) -> str:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _measured(cfg, cams: int, device: torch.device, steps: int, gpu_memory: int | None) -> dict:
    try:
        return {**measure_one(cfg, cams, device, steps, gpu_memory), "status": "ok"}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    except Exception as e:  # noqa: BLE001 - one row says what broke; the check goes on
        return {"status": f"error: {_why(e)}"}


def _compare(row: dict, p: dict) -> None:
    """Put the plan `p` beside the measurement in `row`."""
    row.update({k: p[k] for k in ("planned_tracked_gib", "planned_peak_gib", "planned_tflop", "plan_s")})
    row.setdefault("seq_len", p["seq_len"])
    row.setdefault("tokens_per_camera", p["tokens_per_camera"])
    if row.get("engine") is not None and p["planned_engine"] != row["engine"]:
        row["engine"] = f"{row['engine']} (plan: {p['planned_engine']})"
    if row.get("measured_gib") is not None:
        row["ratio"] = row["measured_gib"] / p["planned_tracked_gib"]
    if row.get("step_s"):
        row["achieved_tflops"] = p["planned_tflop"] / row["step_s"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fsdp-worker":
        fsdp_worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    else:
        main()
