"""2-rank FSDP (--fsdp) against 2-rank data parallelism on the tiny models, side by side in one run.

    python tools/bench_fsdp.py [--steps 6] [--family internvl] [--rounds 2]

Launches `torchrun --nproc_per_node 2` of this file's worker, alternating DP and FSDP `--rounds`
times (a shared machine's load then hits both alike), multi + AGP + re-weighting, micro-batch 1,
--grad-accum 2. Prints the median step time of each (the first step, with its warm-up, dropped),
their ratio, and the bytes one rank holds by category at the end of the run: its weights, the
step's gradient, the per-loss gradient rows, AdamW's state. On one machine the collectives are
gloo over loopback, so the ratio measures FSDP's extra all-gathers / reduce-scatters against DP's
one all-reduce of the K rows; not a GPU interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = {"perception": [0], "reasoning": [0, 1, 2, 3, 4], "planning": [4]}  # the tiny teachers' 6 layers


def worker(root: Path, family: str, out: Path, fsdp: bool, steps: int) -> None:
    import torch

    from drivekd.data.loaders import load_samples
    from drivekd.distributed import Dist
    from drivekd.teacher.online import compute_targets
    from drivekd.trainer.loop import Trainer
    from drivekd.trainer.plan import validate
    from drivekd.trainer.settings import TrainConfig

    torch.set_num_threads(1)
    data, images = root / "demo" / "train.json", root / "demo"
    targets = compute_targets(root / "tiny" / f"{family}-teacher", load_samples(data, images), LAYERS)
    cfg = TrainConfig(student=root / "tiny" / f"{family}-student", data=data, images=images, out=out, num_workers=0,
                      progress=False, grad_accum=2, micro_batch=1, max_steps=steps, report_to="none", save_every=0,
                      device="cpu", fsdp=fsdp, contribution=False)
    dist = Dist(cfg.device)
    plan = validate(cfg, targets, world=dist.world)
    trainer = Trainer(plan, plan.source, dist)
    trainer.run()
    ts = trainer.train_step
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    nbytes = lambda ts_: sum(local(t).numel() * local(t).element_size() for t in ts_)  # noqa: E731
    rows = ts.bufs if isinstance(ts.bufs, torch.Tensor) else (ts.bufs.buffer if ts.bufs is not None else None)
    held = {"weights": nbytes(ts.model.parameters()), "gradients": nbytes([ts.grads.flat]),
            "grad_rows": nbytes([rows]) if rows is not None else 0,
            "optimizer_state": nbytes([v for s in ts.optimizer.state.values() for v in s.values() if torch.is_tensor(v)])}
    if dist.main:
        (out / "held.json").write_text(json.dumps(held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--family", default="internvl", choices=("internvl", "qwen2_5_vl"))
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from drivekd.demo.scenes import make_demo_data
    from drivekd.demo.tiny_models import make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    make_tiny_models(root / "tiny")
    make_demo_data(root / "demo", groups=4, questions_per_group=3, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    times: dict[str, list[float]] = {"dp": [], "fsdp": []}
    held: dict[str, dict] = {}
    for r in range(a.rounds):
        for mode in ("dp", "fsdp"):
            out = root / f"{mode}-{r}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker",
                   str(root), a.family, str(out), mode, str(a.steps)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{mode} run failed:\n{p.stderr[-3000:]}")
            lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            times[mode] += [l["step_time_s"] for l in lines[1:]]
            held[mode] = json.loads((out / "held.json").read_text())
    dp, fs = statistics.median(times["dp"]), statistics.median(times["fsdp"])
    print(f"{a.family}, 2 gloo ranks, multi + AGP, micro-batch 1 x grad-accum 2, {a.rounds} rounds x {a.steps - 1} steps each")
    print(f"median step time: data parallel {dp * 1e3:.1f} ms, FSDP {fs * 1e3:.1f} ms, FSDP / DP = {fs / dp:.2f}")
    print(f"{'bytes per rank':<18}{'DP':>12}{'FSDP':>12}")
    for k in held["dp"]:
        print(f"{k:<18}{held['dp'][k]:>12,}{held['fsdp'][k]:>12,}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        root, family, out, mode, steps = sys.argv[2:7]
        worker(Path(root), family, Path(out), mode == "fsdp", int(steps))
    else:
        main()
