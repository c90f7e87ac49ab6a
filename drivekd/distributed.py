"""Processes under torchrun: rank, world size, device and the few collectives drivekd uses.

One home for the teacher pass (drivekd/teacher/build.py), the analysis pass (drivekd/analyze/run.py)
and the trainer. In a single process (no WORLD_SIZE) every collective is a no-op, so callers never
branch on the world size. Also the fault hook the passes' kill-and-resume tests drive.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from typing import Callable

import torch


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Dist:
    """Rank, world size and device; collective helpers that are no-ops in a single process.

    `device_flag`: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda, cuda:N.
    The process group uses nccl for a CUDA device, gloo otherwise.

    The trainer does NOT wrap the model in DDP: its automatic gradient sync would average the
    summed gradient, while the projection must see the per-loss rows averaged across ranks.
    """

    def __init__(self, device_flag: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_flag == "auto":
            device_flag = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device_flag == "cuda" and self.world > 1:
            device_flag = f"cuda:{local}"
        self.device = torch.device(device_flag)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                # Torn down before the interpreter finalizes: a group left to the C++ destructors can
                # abort a rank that finished its work ("terminate called without an active
                # exception", exit -6), and torchrun then reports the whole run as failed.
                atexit.register(_destroy_group)
            self.rank = dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (t must be on `self.device`)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self.sum_(t).div_(self.world)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.sum_(t).item() > 0)

    def any_each(self, flags: list[bool]) -> list[bool]:
        """Element-wise `any` over ranks of a list of booleans of the same length on every rank."""
        if self.world == 1:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float32, device=self.device)
        return (self.sum_(t) > 0).tolist()

    def gather_ids(self, ids: list[str]) -> list[str]:
        """Every rank's list, concatenated in rank order (the input itself in a single process)."""
        if self.world == 1:
            return ids
        import torch.distributed as dist

        out: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(out, ids)
        return [i for part in out for i in part]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world), initialising the process group under torchrun (device auto). For passes that
    need no device of their own beyond what `Dist("auto")` picks."""
    d = Dist("auto")
    return d.rank, d.world


def barrier(world: int) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world > 1:
        Dist("auto").barrier()


def fault_hook() -> Callable[[], None] | None:
    """Test hooks of the resumable passes (teacher store build, analysis), called once per unit written:
    DRIVEKD_FAULT_KILL_AFTER=N sends SIGKILL to this process after N calls, a real kill -9 at a
    reproducible point (tests of resume use it); DRIVEKD_FAULT_SLOW_WRITES=S sleeps S seconds in
    each, so that a test's second build certainly starts while the first is running (tests of the
    store lock). None when neither is set: callers skip the call."""
    n = os.environ.get("DRIVEKD_FAULT_KILL_AFTER")
    slow = float(os.environ.get("DRIVEKD_FAULT_SLOW_WRITES") or 0)
    if not n and not slow:
        return None
    left = [int(n) if n else -1]

    def hook():
        if slow:
            time.sleep(slow)
        left[0] -= 1
        if left[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


__all__ = ["Dist", "barrier", "fault_hook", "rank_world"]
