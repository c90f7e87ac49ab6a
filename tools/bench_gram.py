"""Gram engine vs rows engine: one micro-step each, side by side in one run, one torch thread.

rows: forward, K backwards into K x N rows (GradBuffers), combine(agp) into the flat grads.
gram: forward, GramEngine.gram (one K-batched backward), coefficients(agp), one backward.
Reported: median step time of each and their ratio (target <= 1.35), and the bytes each holds
beyond the model and its gradients (rows: K x N x 4; gram: at most K x the largest parameter x 4,
transient, plus the K-batched activation gradients).

    .venv/bin/python tools/bench_gram.py             # real-width layers (InternVL3-1B text: 896 / 14 q heads / 2 kv / 4864, T = 1800)
    .venv/bin/python tools/bench_gram.py --tiny      # also the tiny students of both families

--proxy (issue 29): whole optimizer steps of drivekd's step code (TrainStep: capture, losses,
per-loss gradients, projection, AdamW), random weights, fp32, CPU, one thread, on a real-width
proxy of a shipped student (configs/models/<--model>: its widths and vocabulary, --text-layers
text + --vision-layers vision layers) with the planner's synthetic --cameras sample: plain
fine-tuning (CE only) vs multi + AGP with --grad-engine rows vs gram, each case in its own process
(peak RSS is the process's), one after the other in one run; then the ops that still fell back to a
loop over K under vmap, and the planner's FLOPs of the same steps beside the measured ratio.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_gram.py --proxy --text-layers 3 --vision-layers 2 --cameras 6 --warmup 1 --steps 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drivekd.projection import GradBuffers, GramEngine, coefficients, combine  # noqa: E402

ORDER = [3, 1, 2]


def step_rows(params, make_losses, flat):
    losses = make_losses()
    K = len(losses)
    bufs = GradBuffers(params, K)
    for k in range(K):
        bufs.backward(k, losses[k], retain_graph=k < K - 1)
    combine(bufs.buffer, "agp", ORDER[: K - 1] if K == 4 else list(range(1, K)), accumulate_into=flat)
    return bufs.buffer.numel() * bufs.buffer.element_size()


def step_gram(params, make_losses, flat):
    losses = make_losses()
    K = len(losses)
    engine = GramEngine(params)
    G = engine.gram(losses)
    lam = coefficients(G, "agp", ORDER[: K - 1] if K == 4 else list(range(1, K)))
    engine.backward(losses, lam)
    return K * max(p.numel() for p in params) * 4


def compare(name, params, make_losses, reps):
    flat = torch.zeros(sum(p.numel() for p in params))
    o = 0
    for p in params:
        p.grad = flat[o : o + p.numel()].view_as(p)
        o += p.numel()
    times = {"rows": [], "gram": []}
    held = {}
    for r in range(reps + 1):  # first round: warm-up
        for eng, fn in (("rows", step_rows), ("gram", step_gram)) if r % 2 == 0 else (("gram", step_gram), ("rows", step_rows)):
            t = time.perf_counter()
            held[eng] = fn(params, make_losses, flat)
            if r:
                times[eng].append(time.perf_counter() - t)
    tr, tg = statistics.median(times["rows"]), statistics.median(times["gram"])
    n = sum(p.numel() for p in params)
    print(f"{name}: N = {n / 1e6:.2f}M params, K = 4, {reps} reps")
    print(f"  step time rows {tr:.3f} s, gram {tg:.3f} s, ratio gram/rows {tg / tr:.2f}")
    print(f"  held beyond model+grads: rows {held['rows'] / 2**20:.1f} MiB (K x N x 4), "
          f"gram <= {held['gram'] / 2**20:.1f} MiB transient (K x largest parameter x 4): {held['rows'] / held['gram']:.1f}x less")


def real_width(T: int, layers: int, reps: int):
    """A Qwen2 text stack at InternVL3-1B's width; 4 losses read different depths like the recipes
    (CE-like on the last layer, full-map-like on every layer, layer-0 and layer L-2 terms)."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=T + 8)
    model = Qwen2Model(cfg)
    model.config.use_cache = False
    ids = torch.randint(0, 1024, (1, T))
    params = [p for p in model.parameters() if p.requires_grad]

    def make_losses():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # layers + 1 tensors (1, T, 896)
        last = hs[-1]
        return [last.float().logsumexp(-1).mean(), sum(h.pow(2).mean() for h in hs[1:]) * 1e-2,
                hs[1].sin().mean(), hs[-2].cos().mean()]

    compare(f"real width (hidden 896, 14/2 heads, inter 4864, {layers} layers, T = {T})", params, make_losses, reps)


def tiny(reps: int):
    import json
    import tempfile

    from drivekd.data.loaders import load_samples
    from drivekd.demo import make_demo_data, make_tiny_models
    from drivekd.distributed import Dist
    from drivekd.families.capture import capture_attention
    from drivekd.layers import recipe_layers
    from drivekd.roles import ROLES
    from drivekd.teacher.online import compute_targets
    from drivekd.trainer.data import Collate, TargetDataset
    from drivekd.trainer.loop import Trainer
    from drivekd.trainer.plan import validate
    from drivekd.trainer.settings import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_tiny_models(d / "m")
        make_demo_data(d / "demo", groups=4, questions_per_group=3, seed=0)
        samples = load_samples(d / "demo" / "train.json")
        for fam in ("internvl", "qwen2_5_vl"):
            teacher = d / "m" / f"{fam}-teacher"
            conf = json.loads((teacher / "config.json").read_text())
            L = int((conf.get("text_config") or conf)["num_hidden_layers"])
            targets = compute_targets(teacher, samples, {r: recipe_layers(r, L) for r in ROLES})  # each role's recipe layers
            cfg = TrainConfig(student=d / "m" / f"{fam}-student", data=d / "demo" / "train.json", out=d / "unused", num_workers=0,
                              progress=False, max_steps=1, grad_accum=1, micro_batch=2, save_every=0, dynamic_weights=False,
                              warmup_ratio=0.0)
            plan = validate(cfg, targets)
            tr = Trainer(plan, plan.source, Dist("cpu"))
            ds = TargetDataset(plan.samples, tr.source, plan.terms)
            batch = Collate(tr.family, plan.terms, tr.source)([ds[i] for i in (0, 5)]).to(tr.device)
            am = batch.inputs.tensors["attention_mask"].bool()
            with capture_attention(tr.model, tr.plan.student_layers, grad=True, attention_mask=am) as maps:
                compare(f"tiny {fam} student (micro-batch 2, real losses)", tr.params,
                        lambda: tr._losses(batch, maps)[0], reps)


# ----------------------------------------------------------------------------- the real-width VLM proxy (issue 29)

PROXY_CASES = {  # name -> TrainConfig changes (as tools/gpu_check.py's variants)
    "sft": {"recipe": "sft", "dynamic_weights": False},
    "rows": {"projection": "agp", "grad_engine": "rows"},
    "gram": {"projection": "agp", "grad_engine": "gram"},
}


def _images():
    # The README's six-camera image settings (as tools/gpu_check.py): InternVL one 448-px tile per
    # camera (256 tokens), Qwen2.5-VL max_pixels 200704.
    from drivekd.images import ImageSettings

    return {"internvl": ImageSettings(tiling=False), "qwen2_5_vl": ImageSettings(max_pixels=200704)}


PROXY_IMAGES = _images()


def proxy_student(out: Path, model: str, text_layers: int, vision_layers: int) -> Path:
    """configs/models/<model> (config and processor files, no weights) at a reduced depth."""
    import shutil

    from drivekd.families.base import Depth, detect_family, family_class
    from drivekd.planner import plan as P

    src = Path(__file__).resolve().parents[1] / "configs" / "models" / model
    fam = family_class(detect_family(src))
    config = P.student_config(src)
    kinds = len(fam.vision_depth(config.vision_config))
    fam.with_depth(config, Depth(text_layers, (vision_layers,) * kinds)).save_pretrained(out)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def proxy_case(case: str, student: Path, cameras: int, warmup: int, steps: int) -> dict:
    """`warmup` + `steps` optimizer steps of drivekd's step code (TrainStep: capture, losses,
    per-loss gradients, projection, AdamW) on the planner's synthetic sample, random weights, fp32.
    Runs in its own process (peak RSS is the process's)."""
    import resource
    import warnings

    from drivekd.distributed import Dist
    from drivekd.families.base import detect_family
    from drivekd.optim.precision import param_dtype
    from drivekd.planner import plan as P
    from drivekd.trainer.loop import prepare_student
    from drivekd.trainer.settings import TrainConfig
    from drivekd.trainer.step import AssumeFinite, TrainStep

    family = detect_family(student)
    cfg = TrainConfig(**{"student": student, "recipe": "multi", "lr": 1e-5, "max_grad_norm": 1.0,
                         "image_settings": PROXY_IMAGES[family], **PROXY_CASES[case]})
    config = P.student_config(student)
    _, L = P.model_depth(student)
    shapes = P.shapes_for(family, config, student, cameras, None, cfg.image_settings)
    plan = P.dry_plan(cfg, L, family)
    model = prepare_student(P.build_student(student, family, config, param_dtype(cfg.precision)), cfg)
    ts = TrainStep(model, plan, Dist("cpu"), None, AssumeFinite())
    batch = P.synthetic_batch(shapes, config, plan)
    T = shapes.seq_len
    causal = torch.tril(torch.ones(T, T))
    causal = (causal / causal.sum(-1, keepdim=True))[None]  # a row-normalised map per loss layer, as a store delivers
    batch.targets = {r: {s: causal for s in d} for r, d in batch.targets.items()}
    times, cpu = [], []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(warmup + steps):
            t, c = time.perf_counter(), time.process_time()
            ts.micro_step(batch, list(plan.static_weights), list(range(1, len(plan.row_names))), where=f"step {i + 1}")
            ts.average(1)
            ts.clip()
            ts.optimizer_step()
            ts.zero_grad()
            if i >= warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            # CPU seconds beside the wall time: on a shared machine the wall time includes waiting.
            print(f"  {case} step {i + 1}: {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU",
                  file=sys.stderr, flush=True)
    fallbacks = sorted(getattr(ts.gram_engine, "fallbacks", set()) if ts.gram_engine else set())
    return {"case": case, "engine": ts.engine, "seq_len": T, "K": ts.K, "params": sum(p.numel() for p in ts.params),
            "step_s": statistics.median(times), "times": times, "cpu_s": statistics.median(cpu),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "fallbacks": fallbacks, "warnings": len(seen)}


def proxy(model: str, text_layers: int, vision_layers: int, cameras: int, warmup: int, steps: int, cases: list[str]):
    """Each case in its own process, one after the other, in this one run; then the table."""
    import json
    import subprocess
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as d:
        student = proxy_student(Path(d) / "student", model, text_layers, vision_layers)
        for case in cases:
            cmd = [sys.executable, __file__, "--proxy-case", case, "--student", str(student), "--cameras", str(cameras),
                   "--warmup", str(warmup), "--steps", str(steps)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["case"] == "sft"), rows[0])
    rw = next((r for r in rows if r["case"] == "rows"), None)
    print(f"\n{model} proxy: {text_layers} text + {vision_layers} vision layers, {cameras} cameras, T = {base['seq_len']}, "
          f"{base['params'] / 1e6:.0f}M params, CPU, 1 thread, fp32, {warmup} warm-up + {steps} timed steps (median)")
    print("| run | s/step | x plain FT | x rows | CPU s/step | x rows | peak RSS | x plain FT |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        xr = f"{r['step_s'] / rw['step_s']:.2f}" if rw else "n/a"
        xc = f"{r['cpu_s'] / rw['cpu_s']:.2f}" if rw else "n/a"
        print(f"| {r['case']} ({r['engine']}) | {r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f} | {xr} | {r['cpu_s']:.1f} | {xc} | "
              f"{r['peak_rss_mib']:.0f} MiB | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} |")
    for r in rows:
        if r["case"] == "gram":
            print("ops without a vmap batching rule (looped over K) in the gram step:", ", ".join(r["fallbacks"]) or "none")
    print("the planner's count of the same steps (drivekd-train --dry-run, fake tensors):")
    for r in rows:
        try:
            plan = proxy_plan(r["case"], model, text_layers, vision_layers, cameras)
        except Exception as e:  # noqa: BLE001 - the measured table above stands without it
            print(f"  {r['case']}: planner failed ({type(e).__name__}: {e})")
            continue
        r["planned_tflop"] = plan["flops"] / 1e12
        print(f"  {r['case']}: {r['planned_tflop']:.2f} TFLOP, peak {plan['peak_bytes'] / 2**30:.2f} GiB (engine {plan['grad_engine']})")
    if rw and all("planned_tflop" in r for r in rows):
        g = next((r for r in rows if r["case"] == "gram"), None)
        if g:
            print(f"gram / rows: measured {g['step_s'] / rw['step_s']:.2f}x, planned FLOPs {g['planned_tflop'] / rw['planned_tflop']:.2f}x")
    return rows


def proxy_plan(case: str, model: str, text_layers: int, vision_layers: int, cameras: int) -> dict:
    import tempfile

    from drivekd.families.base import detect_family
    from drivekd.planner.plan import dry_run
    from drivekd.trainer.settings import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        student = proxy_student(Path(d) / "student", model, text_layers, vision_layers)
        cfg = TrainConfig(**{"student": student, "recipe": "multi", "lr": 1e-5, "max_grad_norm": 1.0,
                             "image_settings": PROXY_IMAGES[detect_family(student)], **PROXY_CASES[case]})
        return dry_run(cfg, cameras=cameras, suggest=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="also the tiny students")
    ap.add_argument("--T", type=int, default=1800)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--proxy", action="store_true", help="the real-width VLM proxy: plain fine-tuning vs rows vs gram steps")
    ap.add_argument("--model", default="InternVL3-1B-hf", help="--proxy: a config folder under configs/models")
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(PROXY_CASES), choices=list(PROXY_CASES))
    ap.add_argument("--proxy-case", choices=list(PROXY_CASES), help=argparse.SUPPRESS)
    ap.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.proxy_case:
        import json

        print(json.dumps(proxy_case(a.proxy_case, a.student, a.cameras, a.warmup, a.steps)))
        return
    if a.proxy:
        proxy(a.model, a.text_layers, a.vision_layers, a.cameras, a.warmup, a.steps, a.cases)
        return
    if a.tiny:
        tiny(max(a.reps, 5))
    real_width(a.T, a.layers, a.reps)


if __name__ == "__main__":
    main()
