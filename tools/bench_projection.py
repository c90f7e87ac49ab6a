"""Benchmark drivekd.projection.combine against a per-parameter reference and the memory-bound limit.

For K = 4 gradient rows of N elements (fp32 and bf16) it reports, as medians over repeats:

* ``mv``: ``torch.mv(buffer, ones(N))``, one read pass (the brief's memory-bound limit), and
  ``read``: the fastest single read pass we found (min of mv and ``buffer.sum(dim=1)``; on CPU
  torch.mv is not bandwidth-bound for bf16, so the ratio against it would flatter us);
* ``agp``: ``combine(buffer, "agp")`` returning a new fp32 vector (its first touch page-faults a
  fresh N-vector), and ``agp+=``: ``combine(..., accumulate_into=grads)``, the trainer's path;
* ``ref``: a reference-style AGP as the public Drive-KD trainer computes it: per-loss lists of
  several hundred per-parameter tensors, every dot product a Python loop over parameters with one
  ``.item()`` per parameter, projected lists materialised;
* extra peak memory beyond the K x N buffer, measured in a fresh subprocess per case (peak RSS
  during the call, reset just before it via /proc/self/clear_refs, minus RSS before it; CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), in units
  of one fp32 N-vector.

    python tools/bench_projection.py                       # N = 1e6, 1e7, 1e8; fp32 and bf16
    python tools/bench_projection.py --sizes 1e6 1e7 --dtypes float32 --repeats 9
    python tools/bench_projection.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from drivekd.projection import combine  # noqa: E402

K = 4
ORDER = [2, 3, 1]


# ----------------------------------------------------------------------------- inputs


def make_buffer(N: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Correlated rows (so projections fire), filled chunk-wise: no N-sized temporary."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g)
    B = torch.empty(K, N, dtype=dtype, device=device)
    step = 1 << 16
    for s in range(0, N, step):
        e = min(N, s + step)
        B[:, s:e].copy_(mix @ torch.randn(K, e - s, generator=g))
    return B


def param_sizes(N: int, count: int = 400, seed: int = 0) -> list[int]:
    """Several hundred parameter sizes, log-uniform over ~4 decades (biases to big matrices)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(count, generator=g) * math.log(1e4))
    sizes = [max(1, int(x)) for x in (w / w.sum() * N).tolist()]
    sizes[-1] += N - sum(sizes)
    return sizes


def split_rows(B: torch.Tensor, sizes: list[int]) -> list[list[torch.Tensor]]:
    return [list(torch.split(B[k], sizes)) for k in range(B.shape[0])]


# ----------------------------------------------------------------------------- reference-style AGP


def ref_dot(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> float:
    total = 0.0
    for a, b in zip(ga, gb):
        total += float((a.float() * b.float()).sum().item())
    return total


def ref_proj(f: list[torch.Tensor], a: list[torch.Tensor], eps: float = 1e-12) -> list[torch.Tensor]:
    d = ref_dot(f, a)
    if d >= 0.0:
        return f
    coef = d / (ref_dot(a, a) + eps)
    return [x - coef * y for x, y in zip(f, a)]


def ref_sum(*lists: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for parts in zip(*lists):
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p
        out.append(acc)
    return out


def ref_agp(lists: list[list[torch.Tensor]], order: list[int]) -> list[torch.Tensor]:
    sup = lists[0]
    merged = {k: ref_sum(sup, ref_proj(lists[k], sup)) for k in range(1, len(lists))}
    tilde = dict(merged)
    for i in order:
        for j in order:
            if j != i:
                tilde[i] = ref_proj(tilde[i], merged[j])
    return ref_sum(*tilde.values())


# ----------------------------------------------------------------------------- timing


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_case(N: int, dtype: torch.dtype, device: str, repeats: int, ref_repeats: int) -> dict:
    B = make_buffer(N, dtype, device)
    ones = torch.ones(N, dtype=dtype, device=device)
    acc = torch.zeros(N, dtype=torch.float32, device=device)
    lists = split_rows(B, param_sizes(N))
    fns = {
        "mv": lambda: torch.mv(B, ones),
        "sum": lambda: B.sum(dim=1),
        "agp": lambda: combine(B, "agp", ORDER),
        "agp+=": lambda: combine(B, "agp", ORDER, accumulate_into=acc),
    }
    for fn in fns.values():  # warm-up (thread pools, allocator, first-touch of acc)
        fn()
    times: dict[str, list[float]] = {k: [] for k in [*fns, "ref"]}
    for r in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
        if r < ref_repeats:
            times["ref"].append(timed(lambda: ref_agp(lists, ORDER), device))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    # the two implementations agree
    ref = torch.cat(ref_agp(lists, ORDER)).double()
    ours = combine(B, "agp", ORDER).double()
    med["rel_diff"] = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    med["read"] = min(med["mv"], med["sum"])
    return med


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: an upper bound


def memory_case(N: int, dtype: torch.dtype, mode: str) -> int:
    """Extra peak bytes of one call beyond what is resident before it (run in a fresh process)."""
    small = make_buffer(4096, dtype, "cpu")
    combine(small, "agp", ORDER)  # warm-up: libraries, thread pools
    ref_agp(split_rows(small, param_sizes(4096, 16)), ORDER)
    B = make_buffer(N, dtype, "cpu")
    acc = torch.zeros(N, dtype=torch.float32) if mode == "agp+=" else None
    lists = split_rows(B, param_sizes(N)) if mode == "ref" else None
    reset_peak_rss()
    before = rss_bytes()
    if mode == "agp":
        out = combine(B, "agp", ORDER)
    elif mode == "agp+=":
        out = combine(B, "agp", ORDER, accumulate_into=acc)
    else:
        out = ref_agp(lists, ORDER)
    extra = peak_rss_bytes() - before
    del out
    return extra


def memory_case_cuda(N: int, dtype: torch.dtype, mode: str) -> int:
    B = make_buffer(N, dtype, "cuda")
    acc = torch.zeros(N, dtype=torch.float32, device="cuda") if mode == "agp+=" else None
    lists = split_rows(B, param_sizes(N)) if mode == "ref" else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    if mode == "agp":
        out = combine(B, "agp", ORDER)
    elif mode == "agp+=":
        out = combine(B, "agp", ORDER, accumulate_into=acc)
    else:
        out = ref_agp(lists, ORDER)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra


def measure_memory(N: int, dtype_name: str, mode: str, device: str) -> int:
    if device == "cuda":
        return memory_case_cuda(N, getattr(torch, dtype_name), mode)
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()),
           "--_memory-case", str(N), dtype_name, mode]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(res.stdout.strip().splitlines()[-1])["extra_bytes"])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8], help="N values (default 1e6 1e7 1e8)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    ap.add_argument("--ref-repeats", type=int, default=3, help="repeats of the (slow) reference-style AGP")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the extra-memory measurement")
    ap.add_argument("--_memory-case", nargs=3, metavar=("N", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._memory_case:
        if args.threads:
            torch.set_num_threads(args.threads)
        N, dtype_name, mode = args._memory_case
        print(json.dumps({"extra_bytes": memory_case(int(N), getattr(torch, dtype_name), mode)}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here; run with --device cpu")

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, K = {K}, "
          f"median of {args.repeats} (reference: {args.ref_repeats}); times in ms; "
          "mem = extra peak / one fp32 N-vector (4N bytes)")
    head = (f"{'N':>6} {'dtype':>8} {'buf MB':>7} {'mv':>8} {'read':>8} {'agp':>8} {'agp+=':>8} {'ref':>9} "
            f"{'ref/agp':>7} {'agp/mv':>6} {'agp+=/mv':>8} {'agp+=/rd':>8} {'mem agp':>7} {'mem +=':>6} "
            f"{'mem ref':>7} {'rel diff':>8}")
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        N = int(n)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            m = bench_case(N, dtype, args.device, args.repeats, args.ref_repeats)
            if args.no_memory:
                mem = {"agp": float("nan"), "agp+=": float("nan"), "ref": float("nan")}
            else:
                mem = {mode: measure_memory(N, dtype_name, mode, args.device) / (4 * N) for mode in ("agp", "agp+=", "ref")}
            buf_mb = K * N * torch.empty((), dtype=dtype).element_size() / 2**20
            print(f"{N:>6.0e} {dtype_name:>8} {buf_mb:>7.0f} {m['mv'] * 1e3:>8.2f} {m['read'] * 1e3:>8.2f} "
                  f"{m['agp'] * 1e3:>8.2f} {m['agp+='] * 1e3:>8.2f} {m['ref'] * 1e3:>9.1f} "
                  f"{m['ref'] / m['agp']:>7.1f} {m['agp'] / m['mv']:>6.2f} {m['agp+='] / m['mv']:>8.2f} "
                  f"{m['agp+='] / m['read']:>8.2f} {mem['agp']:>7.2f} {mem['agp+=']:>6.2f} {mem['ref']:>7.2f} "
                  f"{m['rel_diff']:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
