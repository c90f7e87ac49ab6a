"""Peak memory by category and FLOPs, counted op by op (real or fake tensors alike).

`MemoryTracker` is a TorchDispatchMode: every op's output storage that it has not seen is an
allocation of `storage.nbytes()` bytes, freed when the storage object dies (weakref). Storages that
exist before tracking (weights, flat gradient, per-loss rows, optimizer state, inputs, teacher
targets) are registered with their category; the rest start as temporaries and get promoted:
`saved` (packed for backward, via saved_tensors_hooks) or `maps` (the capture's head-mean maps,
tagged when the capture block closes). At each new peak the set of live storages is remembered,
so the categories are those of the live bytes at the peak. No CUDA caching-allocator rounding (512 B
blocks) and no CUDA context: the planner adds those as the allocator margin.

Host memory (--precision bf16-offload keeps fp32 masters and AdamW state in host RAM) is counted
apart: storages registered with `add(..., "host")` and every storage an op makes inside a
`host_side()` block go to `host_current` / `host_peak`, never to the device's `current` / `peak`
(fake tensors all live on the CPU, so the device is not what tells them apart).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry as FLOP_FORMULAS
from torch.utils.weak import WeakIdKeyDictionary

from drivekd.planner.fake import tensors_of

# Category names, in the order a storage with several tags is attributed (first wins).
CATEGORIES = ("weights", "gradients", "grad_rows", "optimizer_state", "teacher_targets", "inputs", "maps",
              "activations", "temporaries")


@dataclass
class _Info:
    nbytes: int
    tags: set = field(default_factory=set)


class MemoryTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._ids = WeakIdKeyDictionary()  # storage -> serial
        self.infos: dict[int, _Info] = {}
        self.live: set[int] = set()
        self.current = 0
        self.peak = 0
        self._peak_live: frozenset[int] = frozenset()
        self._dirty = False  # current exceeds the stored peak set: snapshot on the next free
        self._hooks = None
        self.flops = 0
        self._host = 0  # depth of host_side() blocks
        self.host_live: set[int] = set()
        self.host_current = 0
        self.host_peak = 0

    # ----- registration -----
    def _storage_serial(self, t: torch.Tensor, host: bool = False) -> int | None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None
        s = self._ids.get(st)
        if s is None and (host or self._host):
            s = len(self.infos)
            self._ids[st] = s
            self.infos[s] = _Info(int(st.nbytes()), {"host"})
            self.host_live.add(s)
            self.host_current += self.infos[s].nbytes
            self.host_peak = max(self.host_peak, self.host_current)
            weakref.finalize(st, self._free_host, s)
        elif s is None:
            s = len(self.infos)
            self._ids[st] = s
            self.infos[s] = _Info(int(st.nbytes()))
            self.live.add(s)
            self.current += self.infos[s].nbytes
            weakref.finalize(st, self._free, s)
            if self.current > self.peak:
                self.peak, self._dirty = self.current, True
        return s

    def _free_host(self, s: int) -> None:
        if s in self.host_live:
            self.host_live.discard(s)
            self.host_current -= self.infos[s].nbytes

    @contextlib.contextmanager
    def host_side(self):
        """Ops in this block allocate host memory (e.g. the offloaded optimizer's CPU step)."""
        self._host += 1
        try:
            yield
        finally:
            self._host -= 1

    def _free(self, s: int) -> None:
        if s in self.live:
            if self._dirty:
                self._snapshot()
            self.live.discard(s)
            self.current -= self.infos[s].nbytes

    def _snapshot(self) -> None:
        self._peak_live = frozenset(self.live)
        self._dirty = False

    def add(self, tensors, tag: str) -> None:
        """Register (or tag) the storages of `tensors` (a tensor or an iterable of them)."""
        for t in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
            s = self._storage_serial(t, host=tag == "host")
            if s is not None:
                self.infos[s].tags.add(tag)

    def reset_peak(self) -> None:
        """Start counting the peak from what is live now."""
        self.peak, self._dirty = self.current, True
        self.host_peak = self.host_current
        self._snapshot()

    # ----- tracking -----
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for o in tensors_of((out,)):
            self._storage_serial(o)
        # FLOPs with torch's own formulas (FlopCounterMode's registry: matmuls, convolutions,
        # attention), counted here rather than by a second stacked mode: each Python mode on the
        # stack costs about as much per op as the fake tensor itself.
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out

    def __enter__(self):
        def pack(t):
            self.add(t, "activations")
            # A detached alias (same storage, so the same bytes live as long): a pack hook that
            # returns the tensor itself makes each saved *output* hold its own grad_fn, a cycle
            # through C++ that Python's gc cannot break, so the graph's saved tensors outlived the
            # step (0.52 GiB at InternVL3-1B counted in the update and validation phases; every
            # micro-step's in a real-tensor count). Without hooks, as in training, there is none.
            return t.detach()

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        return out

    # ----- result -----
    def peak_by_category(self, extra: tuple[str, ...] = ()) -> dict[str, int]:
        """Bytes live at the peak, by category (they sum to `peak`). `extra`: more tags reported as
        categories of their own (before temporaries), e.g. the planned validation's "kv_cache"."""
        if self._dirty:
            self._snapshot()
        order = (*CATEGORIES[:-1], *extra, CATEGORIES[-1])
        out = dict.fromkeys(order, 0)
        for s in self._peak_live:
            info = self.infos[s]
            cat = next((c for c in order if c in info.tags), "temporaries")
            out[cat] += info.nbytes
        return out
