"""Benchmark the lean student attention capture against the plain-autograd reference (prints a table).

    python tools/bench_capture.py [--tokens 1800] [--layers 4] [--steps 2] [--warmup 1] [--threads 1]

All at InternVL3-1B text shapes (Qwen2.5-0.5B: hidden 896, intermediate 4864, 14 query heads,
2 kv heads, head_dim 64, vocabulary 151674, tied embeddings), B = 1, fp32 on CPU, one thread.

(a) bytes autograd saves for backward of one captured layer's head-mean map: lean
    (`head_mean_attention`: query, key, one log-sum-exp per head and row, the mask) vs the
    reference (`head_mean_attention_reference`: every block's fp32 softmax). "new" leaves out the
    storage of the inputs (query, key, mask), which sdpa and the model hold anyway.
(b) forward + backward time of the capture alone, and the no-grad forward (teacher pass).
(c) a student step (forward, backward, AdamW) of a few InternVL3-1B-width decoder layers at T tokens:
    CE on a 96-token answer span only (the floor: plain fine-tuning) vs the multi recipe's attention
    losses (t2v MSE at layer 0 and L-2, full MSE on 0..L-2; projection none: one backward) with
    the lean capture and with the reference capture. Each case runs in its own process: step time
    (median CPU time of the process, robust to other jobs on a shared machine, and wall time), peak RSS, and the bytes autograd saves for backward in the step (counted with
    saved_tensors_hooks on the warm-up step; deterministic, unlike RSS).
Vision layers are left out: the capture only touches the language model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MiB = 2**20
H, HKV, D, HIDDEN, INTER, VOCAB = 14, 2, 64, 896, 4864, 151674
ANSWER = 96
VISION = (20, 20 + 6 * 256)  # six 448-px tiles of 256 tokens each, after a short system prompt


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedBytes:
    """saved_tensors_hooks that count each saved storage once (parameters and `skip` storages aside)."""

    def __init__(self, skip=()):
        self.skip = {t.untyped_storage().data_ptr() for t in skip}
        self.seen: dict[int, int] = {}
        self.largest = 0

    def pack(self, t):
        p = t.untyped_storage().data_ptr()
        if p not in self.skip and t.numel():
            self.seen[p] = t.untyped_storage().nbytes()
            self.largest = max(self.largest, t.numel())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


# ----------------------------------------------------------------------------- (a) + (b)


def case_kernel(args) -> dict:
    import torch

    from drivekd.families.capture import head_mean_attention, head_mean_attention_reference

    T = args.tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, HKV, T, D, generator=g)
    mask = None  # plain causal, what sdpa_mask gives an unpadded batch of 1
    scaling = D**-0.5
    w = torch.rand(1, T, T, generator=g)
    out = {}
    for name, fn in (("lean", head_mean_attention), ("reference", head_mean_attention_reference)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        all_ = SavedBytes()
        new = SavedBytes(skip=(qq, kk))
        with all_.hooks():
            a = fn(qq, kk, mask, scaling)
        with new.hooks():
            a2 = fn(qq, kk, mask, scaling)
        del a2
        (a * w).sum().backward()
        fb, fwd = [], []
        for _ in range(args.repeats):
            qq.grad = kk.grad = None
            t0 = time.process_time()
            a = fn(qq, kk, mask, scaling)
            (a * w).sum().backward()
            fb.append(time.process_time() - t0)
            with torch.no_grad():
                t0 = time.process_time()
                fn(q, k, mask, scaling)
                fwd.append(time.process_time() - t0)
        out[name] = {"saved": all_.total, "saved_new": new.total, "largest": all_.largest,
                     "fwd_bwd_s": statistics.median(fb), "nograd_fwd_s": statistics.median(fwd)}
    return out


# ----------------------------------------------------------------------------- (c)


def text_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                       num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def case_step(args, capture: str) -> dict:
    """One student step, `capture` in {"none" (CE only), "lean", "reference"}."""
    import contextlib

    import torch
    from transformers import Qwen2ForCausalLM

    import drivekd.families.capture as cap_mod
    from drivekd.families.capture import CAPTURE_IMPL, capture_attention, reference_capture
    from drivekd.losses.attention import answer_positions, attention_loss, token_ce
    from drivekd.losses.recipes import plan_term
    from drivekd.roles import ROLES

    base_rss = peak_rss()
    torch.manual_seed(0)
    L, T = args.layers, args.tokens
    cfg = text_config(L)
    cfg._attn_implementation = "sdpa" if capture == "none" else CAPTURE_IMPL
    model = Qwen2ForCausalLM(cfg).train()
    # Capture on the bare language model: its layers are model.model.layers.
    lm_holder = type("Holder", (), {})()
    lm_holder.language_model = model.model
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, VOCAB - 1000, (1, T), generator=torch.Generator().manual_seed(1))
    labels = torch.full((1, T), -100)
    labels[0, T - ANSWER:] = ids[0, T - ANSWER:]
    vision = torch.zeros(1, T, dtype=torch.bool)
    vision[0, VISION[0]:VISION[1]] = True
    text = ~vision
    am = torch.ones(1, T, dtype=torch.bool)
    keep, ce_t = answer_positions(labels)
    terms = [plan_term(r, L, L) for r in ROLES]
    mix = {"perception": 0.8, "reasoning": 0.1, "planning": 0.1}  # a perception sample's row of M
    layers = sorted({s for t in terms for s, _ in t.pairs})
    g = torch.Generator().manual_seed(2)
    targets = {(t.role, s): torch.rand(1, T, T, generator=g).tril_() / T for t in terms for s, _ in t.pairs}

    def step(counter=None):
        hooks = counter.hooks() if counter is not None else contextlib.nullcontext()
        ref = reference_capture() if capture == "reference" else contextlib.nullcontext()
        cap = capture_attention(lm_holder, layers, grad=True, attention_mask=am) if capture != "none" else contextlib.nullcontext({})
        with ref, cap as maps:
            with hooks:
                out = model(input_ids=ids, attention_mask=am.long(), logits_to_keep=keep, use_cache=False)
                loss = token_ce(out.logits, ce_t).mean()
                for t in terms if capture != "none" else ():
                    lk = torch.stack([attention_loss(t.signal, t.kind, maps[s], targets[(t.role, s)], text=text,
                                                     vision=vision, valid=am) for s, _ in t.pairs]).mean(0)
                    loss = loss + mix[t.role] * lk.mean()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = SavedBytes(skip=params)
    t0 = time.perf_counter()
    step(counter)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert cap_mod._IMPL[0] is cap_mod.head_mean_attention  # the reference switch was undone
    return {"step_s": statistics.median(times), "step_cpu_s": statistics.median(cpu), "first_step_s": first, "peak_rss": peak_rss(), "base_rss": base_rss,
            "saved": counter.total, "layers": layers, "params": sum(p.numel() for p in params)}


# ----------------------------------------------------------------------------- driver


CASES = {
    "kernel": case_kernel,
    "floor": lambda a: case_step(a, "none"),
    "lean": lambda a: case_step(a, "lean"),
    "reference": lambda a: case_step(a, "reference"),
}


def run_case(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--tokens", str(args.tokens), "--layers", str(args.layers),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"case {name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}x" if b else "(lean: none)"


def report(r: dict, args) -> str:
    T, L = args.tokens, args.layers
    kn, ref = r["kernel"]["lean"], r["kernel"]["reference"]
    lines = ["| # | measurement | lean | reference | reference / lean |", "|---|---|---|---|---|"]
    lines.append(f"| a | saved for backward, one captured layer (T={T}, {H} heads, {HKV} kv heads, d {D}), all storages | "
                 f"{kn['saved'] / MiB:.2f} MiB | {ref['saved'] / MiB:.1f} MiB | {ref['saved'] / kn['saved']:.0f}x |")
    lines.append(f"| a | same, new storage only (query, key and mask are held by sdpa anyway) | {kn['saved_new'] / MiB:.3f} MiB | "
                 f"{ref['saved_new'] / MiB:.1f} MiB | {ratio(ref['saved_new'], kn['saved_new'])} |")
    lines.append(f"| a | largest saved tensor (elements; heads x T x T = {H * T * T:,}) | {kn['largest']:,} | {ref['largest']:,} | |")
    lines.append(f"| b | capture alone, forward + backward (CPU time) | {kn['fwd_bwd_s'] * 1e3:.0f} ms | {ref['fwd_bwd_s'] * 1e3:.0f} ms | "
                 f"{ref['fwd_bwd_s'] / kn['fwd_bwd_s']:.2f} |")
    lines.append(f"| b | capture alone, no-grad forward, teacher pass (CPU time) | {kn['nograd_fwd_s'] * 1e3:.0f} ms | "
                 f"{ref['nograd_fwd_s'] * 1e3:.0f} ms | {ref['nograd_fwd_s'] / kn['nograd_fwd_s']:.2f} |")
    fl, le, rf = r["floor"], r["lean"], r["reference"]
    lines.append("")
    lines.append(f"(c) student step, {L} decoder layers at InternVL3-1B width ({fl['params'] / 1e6:.0f}M parameters with the tied "
                 f"151674-token embedding), T={T}, fp32, AdamW; capture on layers {le['layers']}:")
    lines.append("")
    lines.append("| case | step CPU time | / floor | step wall time | / floor | peak RSS | / floor | RSS above imports | / floor | saved for backward | / floor |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, c in (("CE only (floor)", fl), ("multi + none, lean capture", le), ("multi + none, reference capture", rf)):
        above, above_fl = c["peak_rss"] - c["base_rss"], fl["peak_rss"] - fl["base_rss"]
        lines.append(f"| {name} | {c['step_cpu_s']:.2f} s | {c['step_cpu_s'] / fl['step_cpu_s']:.3f}x | "
                     f"{c['step_s']:.2f} s | {c['step_s'] / fl['step_s']:.3f}x | {c['peak_rss'] / MiB:.0f} MiB | "
                     f"{c['peak_rss'] / fl['peak_rss']:.3f}x | {above / MiB:.0f} MiB | {above / above_fl:.3f}x | "
                     f"{c['saved'] / MiB:.0f} MiB | {c['saved'] / fl['saved']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1800)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers in (c); the capture takes 0..L-2")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per case in (c)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per case in (c) (the first counts saved bytes)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats in (b)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--report", type=Path, help="print the table of a --json file written earlier, run nothing")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(CASES[args.case](args)))
        return
    if args.report:
        saved = json.loads(args.report.read_text())
        print(report(saved["results"], argparse.Namespace(**saved["args"])))
        return
    t0 = time.perf_counter()
    results = {}
    for name in CASES:
        results[name] = run_case(name, args)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "args": {"tokens": args.tokens, "layers": args.layers}}, indent=1))
    print(report(results, args))
    print(f"\n(total {time.perf_counter() - t0:.0f} s, {args.threads} thread(s); each case in its own process)")


if __name__ == "__main__":
    main()
