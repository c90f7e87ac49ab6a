"""Benchmark the Drive-KD training step (prints a table of ratios).

    python tools/bench_train.py [--work DIR] [--steps 12] [--warmup 2] [--threads 1] [--repeats 3]

(1) drivekd's offline step (targets from the Zarr store, head-mean attention captured at the loss
    layers only, answer-span logits only) vs the reference approach (three teachers in memory,
    eager attention with output_attentions=True on every layer, every step), same student, data,
    multi recipe, AGP. Each case runs in its own process, so peak RSS is per case.
(2) step time with targets read through the DataLoader from the store (0 and 2 workers) vs
    targets already in memory (InMemoryTargets).
(3) step time of AGP vs none, and where AGP's extra time goes: extra backward passes (one per
    loss instead of one for the sum) vs the combine (Gram + projection + one product).
(5) the contribution diagnostics (--contribution, on by default) against --no-contribution: AGP
    (shares from the Gram the step has anyway) and the --projection none fast path (a per-loss Gram
    measured on the first micro-step of each logged step), at --grad-accum 1 and 4, --log-every 1.
(4) a memory model for real sizes: per-parameter bytes measured on a tiny run (weights, grads,
    per-loss rows, AdamW state), per-token/per-layer activation bytes measured on InternVL3-1B-wide
    layers (real hidden sizes, 2 and 4 decoder layers, 1 and 2 vision layers, bf16 autocast) by
    counting the tensors autograd saves, extrapolated to 24+24 layers: predicted peak memory of
    InternVL3-1B (multi, AGP, T ~ 1800, micro-batch 1) against an A100-40GB.

Runs on CPU with the tiny checkpoints (drivekd.demo.tiny_models) and synthetic demo data.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GiB = 2**30
A100 = 40 * GiB  # A100-40GB: 40 GiB of HBM (max_allocated must also leave room for the CUDA context)


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- setup


def prepare(work: Path) -> dict:
    """Tiny models, demo data and a teacher store (built once, reused)."""
    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models
    from drivekd.teacher.build import BuildConfig, build

    models, data, store = work / "models", work / "data", work / "store"
    if not (models / "tiny-models.json").exists():
        make_tiny_models(models, ("internvl",))
    if not (data / "train.json").exists():
        make_demo_data(data, groups=4, questions_per_group=3, seed=0)
    if not (store / "zarr.json").exists():
        t = models / "internvl-teacher"
        build(BuildConfig(teachers={"perception": t, "reasoning": t, "planning": t}, data=data / "train.json", images=data,
                          out=store, progress=False))
    return {"models": models, "data": data, "store": store}


def base_cfg(paths: dict, out: Path, steps: int, **kw):
    from drivekd.trainer.settings import TrainConfig

    d = dict(student=paths["models"] / "internvl-student", data=paths["data"] / "train.json", images=paths["data"], out=out,
             cache=paths["store"], recipe="multi", projection="agp", dynamic_weights=False, max_steps=steps, grad_accum=1,
             micro_batch=1, num_workers=0, save_every=0, progress=False, lr=1e-4, warmup_ratio=0.0)
    d.update(kw)
    return TrainConfig(**d)


def in_memory(store_path: Path, samples) -> "object":
    """Read the whole store into an InMemoryTargets (what 'targets already in memory' means)."""
    from drivekd.store.memory import InMemoryTargets
    from drivekd.store import TeacherStore

    st = TeacherStore(store_path)
    infos = {r: st.role_info(r) for r in st.roles()}
    table = {r: {s.id: st.get(r, s.id) for s in samples} for r in infos}
    return InMemoryTargets(infos, table)


# ----------------------------------------------------------------------------- timed pieces


class Timers:
    """Wall time spent in per-loss backwards, in all backwards, and in combine (monkeypatched)."""

    def __init__(self):
        self.t = {"backward_all": 0.0, "backward_rows": 0.0, "combine": 0.0}

    def install(self):
        import torch

        import drivekd.trainer.step as loop  # the step module calls combine()
        from drivekd.projection.buffers import GradBuffers

        timers = self
        orig_bw, orig_rows, orig_comb = torch.Tensor.backward, GradBuffers.backward, loop.combine

        def bw(self_, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig_bw(self_, *a, **k)
            finally:
                timers.t["backward_all"] += time.perf_counter() - t0

        def rows(self_, *a, **k):
            t0 = time.perf_counter()
            try:
                return orig_rows(self_, *a, **k)
            finally:
                timers.t["backward_rows"] += time.perf_counter() - t0

        def comb(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig_comb(*a, **k)
            finally:
                timers.t["combine"] += time.perf_counter() - t0

        torch.Tensor.backward, GradBuffers.backward, loop.combine = bw, rows, comb


def case_drivekd(paths, args, source: str, workers: int, projection: str, **kw) -> dict:
    from drivekd.data.loaders import load_samples
    from drivekd.trainer.loop import train

    samples = load_samples(paths["data"] / "train.json", paths["data"])
    targets = in_memory(paths["store"], samples) if source == "memory" else None
    timers = Timers()
    timers.install()
    out = Path(tempfile.mkdtemp(dir=args.work, prefix="run-"))
    res = train(base_cfg(paths, out, args.warmup + args.steps, num_workers=workers, projection=projection, **kw), targets)
    times = [m["step_time_s"] for m in res.metrics[args.warmup :]]
    per_step = {k: v / len(res.metrics) for k, v in timers.t.items()}  # seconds per step, all steps
    mean_step = sum(m["step_time_s"] for m in res.metrics) / len(res.metrics)
    return {"step_s": statistics.median(times), "mean_step_s": mean_step, "peak_rss": peak_rss(), "per_step": per_step}


def case_reference(paths, args) -> dict:
    """The reference approach: three teachers in memory, eager all-layer attention every step."""
    import torch

    from drivekd.families.base import Family, load_model
    from drivekd.losses.attention import answer_ce, attention_loss
    from drivekd.projection import GradBuffers, combine
    from drivekd.store import TeacherStore
    from drivekd.trainer.plan import validate
    from drivekd.trainer.data import StreamSampler
    from drivekd.trainer.loop import FlatGrads

    cfg = base_cfg(paths, Path(tempfile.mkdtemp(dir=args.work, prefix="ref-")) / "run", args.warmup + args.steps)
    plan = validate(cfg, TeacherStore(paths["store"]))
    teacher_dir = paths["models"] / "internvl-teacher"
    teachers = {t.role: load_model(teacher_dir, capture=False, attn="eager").eval() for t in plan.terms}  # three in memory
    student = load_model(cfg.student, capture=False, attn="eager").train()
    fam = Family.from_pretrained(cfg.student)
    params = [p for p in student.parameters() if p.requires_grad]
    flat = FlatGrads(params)
    bufs = GradBuffers(params, len(plan.row_names))
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sampler = StreamSampler(len(plan.samples), 1, 1, 0, cfg.seed, 0, plan.total_steps)
    times = []
    for step, idx in enumerate(sampler):
        t0 = time.perf_counter()
        samples = [plan.samples[i] for i in idx]
        inputs = fam.build_inputs(samples)
        am = inputs.tensors["attention_mask"].bool()
        text, vision, labels = inputs.padded("text"), inputs.padded("vision"), inputs.padded("labels")
        mixw = plan.mix_weights([s.capability for s in samples])
        targets = {}
        with torch.no_grad():
            for term in plan.terms:
                att = teachers[term.role](**inputs.tensors, output_attentions=True).attentions  # every layer (B, H, T, T)
                targets[term.role] = {s: torch.stack([att[t].float().mean(1) for t in ts]).mean(0) for s, ts in term.pairs}
        out = student(**inputs.tensors, output_attentions=True)  # every layer, full logits
        losses = [answer_ce(out.logits, labels).mean()]
        for k, term in enumerate(plan.terms):
            per = [attention_loss(term.signal, term.kind, out.attentions[s].float().mean(1), targets[term.role][s], text=text,
                                  vision=vision, valid=am) for s, _ in term.pairs]
            losses.append((mixw[:, k] * torch.stack(per).mean(0)).mean())
        bufs.zero_()
        for r, loss in enumerate(losses):
            bufs.backward(r, plan.static_weights[r] * loss, retain_graph=r < len(losses) - 1)
        combine(bufs.buffer, "agp", [1, 2, 3], accumulate_into=flat.flat)
        opt.step()
        flat.flat.zero_()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[args.warmup :]), "peak_rss": peak_rss()}


# ----------------------------------------------------------------------------- (4) memory model


def per_param_bytes(paths, args) -> dict:
    """Bytes per trainable parameter held by the trainer (measured on a tiny run after one step)."""
    import torch

    from drivekd.data.loaders import load_samples
    from drivekd.trainer.plan import validate
    from drivekd.trainer.loop import Dist, Trainer

    out = {}
    samples = load_samples(paths["data"] / "train.json", paths["data"])
    tg = in_memory(paths["store"], samples)
    for dtype in ("float32", "bfloat16"):
        cfg = base_cfg(paths, Path(tempfile.mkdtemp(dir=args.work, prefix="pp-")) / "run", 1, grad_buffer_dtype=dtype)
        tr = Trainer(validate(cfg, tg), tg, Dist("cpu"))
        tr.run()
        N = sum(p.numel() for p in tr.train_step.params)
        held = sum(p.numel() * p.element_size() for p in tr.train_step.params)
        held += tr.train_step.grads.flat.numel() * tr.train_step.grads.flat.element_size()
        held += tr.train_step.bufs.buffer.numel() * tr.train_step.bufs.buffer.element_size()
        for st in tr.optimizer.state.values():
            held += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        out[dtype] = {"bytes_per_param": held / N, "rows": len(tr.plan.row_names)}
    return out


def internvl3_1b_config(text_layers: int, vision_layers: int):
    """InternVL3-1B-hf (InternViT-300M + Qwen2.5-0.5B) widths at a chosen depth."""
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=text_layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
                           image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )


def saved_bytes(text_layers: int, vision_layers: int, T: int, tiles: int, answer: int) -> dict:
    """Bytes autograd saves for backward in one drivekd micro-step (bf16 autocast): student forward
    with capture at the multi recipe's layers, CE on the answer span, the three attention losses."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from drivekd.families.capture import CAPTURE_IMPL, capture_attention
    from drivekd.losses.attention import answer_positions, attention_loss, token_ce
    from drivekd.losses.recipes import plan_term
    from drivekd.roles import ROLES

    import drivekd.families.capture as capture_mod

    # The capture forms its scores with .float() inputs, but under autocast the matmul still runs in
    # bf16 and masked_fill(finfo(fp32).min) then overflows: run the head-mean with autocast off
    # (reported to the families module; fp32 scores are what it intends).
    if not getattr(capture_mod.head_mean_attention, "_no_autocast", False):
        orig = capture_mod.head_mean_attention

        def head_mean_fp32(query, key, attention_mask, scaling):
            with torch.autocast(query.device.type, enabled=False):
                return orig(query, key, attention_mask, scaling)

        head_mean_fp32._no_autocast = True
        capture_mod.head_mean_attention = head_mean_fp32

    torch.manual_seed(0)
    cfg = internvl3_1b_config(text_layers, vision_layers)
    cfg.text_config._attn_implementation = CAPTURE_IMPL
    cfg.vision_config._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(cfg).train()
    params = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}
    n_img = tiles * 256
    ids = torch.randint(0, 150000, (1, T))
    ids[0, 20 : 20 + n_img] = cfg.image_token_id
    vision = ids[0] == cfg.image_token_id
    text = ~vision
    labels = torch.full((1, T), -100)
    labels[0, T - answer :] = ids[0, T - answer :]
    pixel = torch.randn(tiles, 3, 448, 448)
    am = torch.ones(1, T, dtype=torch.bool)
    L = text_layers
    terms = [plan_term(r, L, L) for r in ROLES]
    layers = sorted({s for t in terms for s, _ in t.pairs})
    seen: dict[tuple, int] = {}
    weight_copies = {"n": 0}

    def pack(t):
        if t.data_ptr() in params or t.numel() == 0:
            return t
        key = (t.untyped_storage().data_ptr(),)
        nbytes = t.untyped_storage().nbytes()
        if key not in seen:
            seen[key] = nbytes
            if tuple(t.shape) in shapes and t.dtype == torch.bfloat16:
                weight_copies["n"] += nbytes  # autocast's bf16 weight copies: a per-parameter cost
        return t

    keep, ce_t = answer_positions(labels)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with capture_attention(model, layers, grad=True, attention_mask=am) as maps, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, pixel_values=pixel, attention_mask=am.long(), logits_to_keep=keep, use_cache=False)
            loss = token_ce(out.logits, ce_t).mean()
            for term in terms:
                for s, _ in term.pairs:
                    tgt = torch.rand(1, T, T)
                    loss = loss + attention_loss(term.signal, term.kind, maps[s], tgt, text=text[None], vision=vision[None], valid=am).mean()
    total = sum(seen.values())
    return {"total": total, "weight_copies": weight_copies["n"], "activations": total - weight_copies["n"],
            "params": sum(p.numel() for p in model.parameters())}


def real_param_count() -> int:
    import torch
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        m = InternVLForConditionalGeneration(internvl3_1b_config(24, 24))
    return sum(p.numel() for p in m.parameters())


def case_memmodel(paths, args) -> dict:
    T, tiles, answer = args.tokens, args.tiles, 96
    pp = per_param_bytes(paths, args)
    # Per-layer slopes: 2 vs 4 decoder layers (1 vision layer), 1 vs 2 vision layers (2 decoder).
    a = saved_bytes(2, 1, T, tiles, answer)
    b = saved_bytes(4, 1, T, tiles, answer)
    c = saved_bytes(2, 2, T, tiles, answer)

    def extrapolate(key):
        text = (b[key] - a[key]) / 2
        vis = c[key] - a[key]
        return text, vis, a[key] + (24 - 2) * text + (24 - 1) * vis

    t_act, v_act, acts = extrapolate("activations")
    _, _, copies = extrapolate("weight_copies")
    return {"per_param": pp, "text_layer_bytes": t_act, "vision_layer_bytes": v_act, "base_bytes": a["activations"],
            "activations_24x24": acts, "weight_copies_24x24": copies, "N": real_param_count(), "T": T, "tiles": tiles,
            "answer_tokens": answer}


def memory_lines(m: dict) -> list[str]:
    """Predicted peak = static (per-parameter) + autocast weight copies + saved activations
    + teacher targets on the device + transient (one layer's temporaries in backward, kept logits)."""
    N, T = m["N"], m["T"]
    targets = 25 * T * T * 4  # multi: 1 + 23 + 1 student layers with a (T, T) fp32 target each
    transient = m["text_layer_bytes"] + 2 * m["answer_tokens"] * 151674 * 4
    # Gradient checkpointing (estimate, not measured): each layer keeps its bf16 input, the
    # captured layers their (T, T) map and loss difference, plus one layer recomputed at a time.
    vis_tokens = m["tiles"] * 1025
    ckpt_acts = (m["base_bytes"] + 24 * T * 896 * 2 + 23 * 2 * T * T * 4 + m["text_layer_bytes"]
                 + 24 * vis_tokens * 1024 * 2 + m["vision_layer_bytes"])
    lines = []
    for rows, acts, label in (("float32", m["activations_24x24"], "no checkpointing"),
                              ("bfloat16", m["activations_24x24"], "no checkpointing"),
                              ("bfloat16", ckpt_acts, "gradient checkpointing (estimate)")):
        bpp = m["per_param"][rows]["bytes_per_param"]
        static = bpp * N
        total = static + m["weight_copies_24x24"] + acts + targets + transient
        share = total / A100
        verdict = "fits" if share < 0.85 else "tight: no room for fragmentation" if share < 1.0 else "does not fit"
        lines.append(
            f"| 4 | InternVL3-1B, multi + AGP, T={T}, mb 1, bf16 autocast, {rows} loss rows, {label}: "
            f"weights+grads+{m['per_param'][rows]['rows']} rows+AdamW {bpp:.0f} B/param x {N / 1e9:.3f}B = {static / GiB:.1f} GiB, "
            f"bf16 weight copies {m['weight_copies_24x24'] / GiB:.1f}, activations {acts / GiB:.1f}, targets {targets / GiB:.2f}, "
            f"transient {transient / GiB:.2f} | {total / GiB:.1f} GiB | {share:.2f} of an A100-40GB ({verdict}) |"
        )
    lines.append(f"| 4 | measured saved-activation bytes at T={T} ({m['tiles']} tiles, bf16 autocast): per decoder layer "
                 f"{m['text_layer_bytes'] / 2**20:.0f} MiB (with capture + losses), per vision layer "
                 f"{m['vision_layer_bytes'] / 2**20:.0f} MiB, rest {m['base_bytes'] / 2**20:.0f} MiB | | |")
    return lines


# ----------------------------------------------------------------------------- driver


CASES = {
    "offline_store": lambda p, a: case_drivekd(p, a, "store", 0, "agp"),
    "offline_store_w2": lambda p, a: case_drivekd(p, a, "store", 2, "agp"),
    "offline_memory": lambda p, a: case_drivekd(p, a, "memory", 0, "agp"),
    "offline_memory_none": lambda p, a: case_drivekd(p, a, "memory", 0, "none"),
    **{f"contrib_{proj}_ga{ga}_{onoff}": (lambda p, a, proj=proj, ga=ga, on=onoff == "on":
                                           case_drivekd(p, a, "memory", 0, proj, grad_accum=ga, contribution=on))
       for proj in ("agp", "none") for ga in (1, 4) for onoff in ("on", "off")},
    "reference": case_reference,
    "memmodel": case_memmodel,
}


def run_case(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--work", str(args.work), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--tokens", str(args.tokens), "--tiles", str(args.tiles)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"case {name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def report(r: dict, args) -> str:
    ref, off = r["reference"], r["offline_store"]
    mem, st0, st2 = r["offline_memory"], r["offline_store"], r["offline_store_w2"]
    agp, none = r["offline_memory"], r["offline_memory_none"]
    lines = ["| # | measurement | value | ratio |", "|---|---|---|---|"]
    lines.append(f"| 1 | step time: reference (3 eager teachers + all-layer attention) vs drivekd offline | "
                 f"{ref['step_s'] * 1e3:.0f} ms vs {off['step_s'] * 1e3:.0f} ms | {ref['step_s'] / off['step_s']:.2f}x faster |")
    lines.append(f"| 1 | peak RSS (whole process): reference vs drivekd offline | {ref['peak_rss'] / 2**20:.0f} MiB vs "
                 f"{off['peak_rss'] / 2**20:.0f} MiB | {ref['peak_rss'] / off['peak_rss']:.2f}x less |")
    lines.append(f"| 2 | step time: store via DataLoader (0 workers) / in memory | {st0['step_s'] * 1e3:.0f} ms / "
                 f"{mem['step_s'] * 1e3:.0f} ms | {st0['step_s'] / mem['step_s']:.2f} |")
    lines.append(f"| 2 | step time: store via DataLoader (2 workers) / in memory | {st2['step_s'] * 1e3:.0f} ms / "
                 f"{mem['step_s'] * 1e3:.0f} ms | {st2['step_s'] / mem['step_s']:.2f} |")
    extra_bw = (agp["per_step"]["backward_rows"] - none["per_step"]["backward_all"]) / agp["mean_step_s"]
    all_bw = agp["per_step"]["backward_rows"] / agp["mean_step_s"]
    comb = agp["per_step"]["combine"] / agp["mean_step_s"]
    lines.append(f"| 3 | step time: agp / none | {agp['step_s'] * 1e3:.0f} ms / {none['step_s'] * 1e3:.0f} ms | "
                 f"{agp['step_s'] / none['step_s']:.2f} |")
    lines.append(f"| 3 | share of the agp step: per-loss backwards (all K) / combine | {all_bw:.1%} / {comb:.2%} | "
                 f"extra backward vs none's single backward: {extra_bw:.1%} of the agp step |")
    lines += memory_lines(r["memmodel"])
    return "\n".join(lines)


def contribution_report(r: dict) -> str:
    """(5): step time with the contribution diagnostics on / off."""
    lines = ["| # | contribution diagnostics: step time on / off | on | off | ratio |", "|---|---|---|---|---|"]
    for proj in ("agp", "none"):
        for ga in (1, 4):
            on, off = r[f"contrib_{proj}_ga{ga}_on"], r[f"contrib_{proj}_ga{ga}_off"]
            what = "AGP (Gram already there)" if proj == "agp" else "none, fast path (per-loss Gram measured)"
            lines.append(f"| 5 | {what}, --grad-accum {ga} | {on['step_s'] * 1e3:.0f} ms | {off['step_s'] * 1e3:.0f} ms | "
                         f"{on['step_s'] / off['step_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one).")
    ap.add_argument("--steps", type=int, default=12, help="Measured optimizer steps per case (one pass over the 12 demo samples).")
    ap.add_argument("--warmup", type=int, default=2, help="Unmeasured first steps per case.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case.")
    ap.add_argument("--repeats", type=int, default=3, help="Runs per timing case (the fastest is kept).")
    ap.add_argument("--tokens", type=int, default=1800, help="(4) sequence length T.")
    ap.add_argument("--tiles", type=int, default=6, help="(4) image tiles (6 cameras x 1 tile = 1536 vision tokens).")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="Run only these cases.")
    args = ap.parse_args()
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="drivekd-bench-"))
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    if args.case:
        paths = prepare(args.work)
        print("RESULT " + json.dumps(CASES[args.case](paths, args)), flush=True)
        return
    prepare(args.work)
    results: dict[str, dict] = {}
    names = args.only or list(CASES)
    # Timing cases run --repeats times, interleaved, and keep the fastest run (the least disturbed
    # by other jobs on the machine); peak RSS is deterministic enough to take from that run.
    for rep in range(args.repeats):
        for name in names:
            if name == "memmodel" and rep > 0:
                continue
            t0 = time.perf_counter()
            r = run_case(name, args)
            if name not in results or r.get("step_s", 0) < results[name].get("step_s", 0):
                results[name] = r
            print(f"  {name} (run {rep + 1}): {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    (args.work / "bench.json").write_text(json.dumps(results, indent=2))
    contrib = {n for n in CASES if n.startswith("contrib_")}
    if set(CASES) <= set(results):
        print(report(results, args))
        print(contribution_report(results))
    elif contrib <= set(results):
        print(contribution_report(results))
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
