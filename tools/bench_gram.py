"""Gram engine vs rows engine: one micro-step each, side by side in one run, one torch thread.

rows: forward, K backwards into K x N rows (GradBuffers), combine(agp) into the flat grads.
gram: forward, GramEngine.gram (one K-batched backward), coefficients(agp), one backward.
Reported: median step time of each and their ratio (target <= 1.35), and the bytes each holds
beyond the model and its gradients (rows: K x N x 4; gram: at most K x the largest parameter x 4,
transient, plus the K-batched activation gradients).

    .venv/bin/python tools/bench_gram.py             # real-width layers (InternVL3-1B text: 896 / 14 q heads / 2 kv / 4864, T = 1800)
    .venv/bin/python tools/bench_gram.py --tiny      # also the tiny students of both families
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="also the tiny students")
    ap.add_argument("--T", type=int, default=1800)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.tiny:
        tiny(max(a.reps, 5))
    real_width(a.T, a.layers, a.reps)


if __name__ == "__main__":
    main()
