"""The script of the suite's 2-rank torchrun launches (tests/test_two_ranks.py).

`python -m torch.distributed.run --nproc_per_node=2 tests/rank_jobs.py JOBS.json`: each rank runs the
jobs of JOBS.json in order ([{"name", "call": "module:function", "args": [...]}]) and prints
`rank R done NAME` after each one, so a test can tell that its job ran even when a later job ends the
launch (the FSDP kill -9 runs last). A job that raises fails the launch: torchrun stops the other rank,
and the tests of the jobs after it report that they did not run.

The jobs are the real entry points: a console script's click command (`cli`, as `python -m` runs it)
or the trainer's `train()`; they share the ranks' one gloo process group (drivekd.distributed.Dist
joins an initialised group instead of creating another)."""

import atexit
import importlib
import json
import os
import sys
from pathlib import Path


def cli(module: str, argv: list[str]) -> None:
    """A drivekd console script (its click command `main`), as `python -m MODULE ARGV...` runs it."""
    command = importlib.import_module(module).main
    try:
        command.main(args=argv, prog_name=module)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{module} {' '.join(argv)} exited with {e.code}") from None


def fsdp_config(tiny, images, data, fam: str, out, **extra):
    """The FSDP runs' settings: multi + AGP + re-weighting, 2 steps of 2 micro-steps over 4 samples (so
    step 2 is the second epoch: a resume from step 1 also restarts the data order), a checkpoint every
    step. test_two_ranks runs it in one process with micro_batch=2 to compare."""
    from drivekd.trainer.settings import TrainConfig

    return TrainConfig(student=Path(tiny) / f"{fam}-student", data=Path(data), images=Path(images), out=Path(out), num_workers=0,
                       progress=False, grad_accum=2, max_steps=2, report_to="none", lr=1e-3, w_perception=1e3, w_reasoning=1e3,
                       device="cpu", warmup_ratio=0.0, **{"save_every": 1, "keep_last": 3, **extra})


def contribution_config(tiny, images, data, out, micro_batch: int, mode: str):
    """The contribution runs' settings: 'fast' (--projection none, no re-weighting: the measured shares)
    or 'calibrated' (--calibrate-kd)."""
    from drivekd.trainer.settings import TrainConfig

    extra = dict(projection="none", dynamic_weights=False) if mode == "fast" else dict(calibrate_kd=1e-4, calibrate_batches=2)
    return TrainConfig(student=Path(tiny) / "internvl-student", data=Path(data), images=Path(images), out=Path(out), num_workers=0,
                       progress=False, max_steps=2, grad_accum=2, micro_batch=micro_batch, save_every=0, report_to="none", lr=1e-3,
                       w_reasoning=1e5, device="cpu", **extra)


_targets: dict[str, dict] = {}


def _targets_of(tiny: str, fam: str, data: str, images: str) -> dict:
    """The tiny teacher's targets for `data`, computed once per rank for each (family, data)."""
    from online_targets import TEACHER_LAYERS, compute_targets

    from drivekd.data.loaders import load_samples

    key = f"{fam}:{data}"
    if key not in _targets:
        _targets[key] = compute_targets(f"{tiny}/{fam}-teacher", load_samples(data, images), TEACHER_LAYERS)
    return _targets[key]


def fsdp_run(tiny: str, images: str, data: str, fam: str, out: str, extra: dict, kill_after: int) -> None:
    """An FSDP run (fsdp_config); kill_after=N: a kill -9 inside this run's Nth sharded save (the fault
    hook is armed at a process's first save, so it is re-armed here)."""
    from drivekd.trainer import checkpoint
    from drivekd.trainer.loop import train

    if kill_after:
        os.environ["DRIVEKD_FAULT_KILL_AFTER"] = str(kill_after)
        checkpoint._SAVE_FAULT.clear()
    train(fsdp_config(tiny, images, data, fam, out, **extra), _targets_of(tiny, fam, data, images))


def contribution_run(tiny: str, images: str, data: str, out: str, micro_batch: int, mode: str) -> None:
    """A measured-shares ('fast') or calibrated run (contribution_config)."""
    from drivekd.trainer.loop import train

    train(contribution_config(tiny, images, data, out, micro_batch, mode), _targets_of(tiny, "internvl", data, images))


def gram_blocks(tiny: str, images: str, scales: list[float], out: str) -> None:
    """The Gram engine over 2 ranks, each holding one sample of the global batch [0, 5]: its blocks are
    all-reduced (mean), and the forward is cut above the deepest loss layer (TrainStep). Rank 0 saves
    the Gram, the combined gradient and the number of blocks for test_two_ranks to compare."""
    import torch
    import torch.distributed as dist
    from test_gram_engine import batch_of, forward, make_trainer

    from drivekd.projection import GramEngine, coefficients

    world, rank = dist.get_world_size(), dist.get_rank()
    targets = _targets_of(tiny, "internvl", f"{images}/train.json", images)
    tr = make_trainer(Path(tiny), Path(images), targets, "internvl", world=world, grad_engine="gram")

    def mean_(block):
        dist.all_reduce(block)
        block.div_(world)

    engine = GramEngine(tr.params, reduce=mean_)
    with forward(tr, batch_of(tr, [[0, 5][rank]])) as losses:
        weighted = [l * s for l, s in zip(losses, scales)]
        cut = tr.train_step._cut
        assert cut is not None
        G = engine.gram(weighted, cut=cut)
        lam = coefficients(G, "agp", [2, 3, 1])
        tr.grads.flat.zero_()
        engine.backward(weighted, lam, cut=cut)
    tr.dist.mean_(tr.grads.flat)  # the loop averages .grad across ranks once per step
    if rank == 0:
        torch.save({"gram": G, "grad": tr.grads.flat.clone(), "blocks": engine.last_blocks}, out)


def exit_handlers() -> None:
    """What the interpreter runs at exit, before finalization: Dist's handler must destroy the group."""
    import torch.distributed as dist

    assert dist.is_initialized()
    atexit._run_exitfuncs()
    print(f"rank {os.environ['RANK']} initialized after exit handlers: {dist.is_initialized()}", flush=True)


def main(path: str) -> None:
    import torch

    torch.set_num_threads(1)
    for job in json.loads(Path(path).read_text()):
        module, function = job["call"].split(":")
        getattr(importlib.import_module(module), function)(*job.get("args", []))
        print(f"rank {os.environ['RANK']} done {job['name']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
