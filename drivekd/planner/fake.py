"""Fake tensors that still take the branches a real run takes.

The planner runs the real model and step code on `FakeTensorMode` tensors: shapes, dtypes and
strides without data, so a 1B-8B model at T = 1800 costs no memory. Fake tensors refuse
data-dependent operations (`.item()`, `.tolist()`, `bool(t)`, `nonzero()`); the model code has a
few (the capture's causal check, Qwen's rope index, `answer_positions`), all of them on small
tensors derived from the inputs (token ids, masks, image grids), never from weights.

`Shadowed` keeps a real copy ("shadow") of every such small tensor: the inputs are created real,
constructors with no tensor inputs (arange, ones) are evaluated for real, and any op whose tensor
inputs all have shadows is evaluated on the shadows too. A data-dependent op on a shadowed fake
then answers from the shadow, and an op whose output shape depends on data (nonzero) gets a fake
built from the real result. An in-place op that mixes in an unshadowed tensor drops the shadow.
So the fake run follows exactly the control flow the real run would for the same inputs, while
every weight-sized tensor stays fake. A data-dependent op on a tensor without a shadow (one that
depends on weights, e.g. a loss value) still raises: the step must keep those out of its traced
part (see drivekd/trainer/step.py `HostChecks`).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

# Shadows kept: integer/bool tensors up to this many elements (the capture's (T, T) causal mask
# at T = 11k is 128M), floating ones only when small (scalars, mixing weights): weight-sized float
# constructors (an accumulator, an empty buffer) are never evaluated for real.
SHADOW_MAX_NUMEL = 1 << 27
SHADOW_MAX_FLOAT_NUMEL = 1 << 16

aten = torch.ops.aten


def tensors_of(args, kwargs=None) -> list[torch.Tensor]:
    """The tensors among an op's arguments (one level of lists/tuples, as aten schemas have):
    much cheaper than pytree flattening, which dominated the dispatch cost."""
    out = []
    for seq in (args, (kwargs or {}).values()):
        for a in seq:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out
_SCALAR_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}


class Shadowed(TorchDispatchMode):
    """Push on top of a FakeTensorMode (enter after it). `real(t)` registers a real tensor as a
    shadowed fake input."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.shadow = WeakIdKeyDictionary()
        self.enabled = True

    @contextlib.contextmanager
    def paused(self):
        """No shadows for what is created inside (model weights, teacher targets: never read)."""
        self.enabled, old = False, self.enabled
        try:
            yield
        finally:
            self.enabled = old

    def real(self, t: torch.Tensor) -> torch.Tensor:
        """A fake copy of the real tensor `t`, with `t` as its shadow."""
        if isinstance(t, FakeTensor):
            raise TypeError("Shadowed.real needs a real tensor (create it under unset_fake_temporarily)")
        f = self.fake_mode.from_tensor(t)
        self.shadow[f] = t
        return f

    def _known(self, x: torch.Tensor) -> bool:
        """A real tensor is its own shadow; a fake one needs a registered shadow."""
        return not isinstance(x, FakeTensor) or x in self.shadow

    @staticmethod
    def _small(x: torch.Tensor) -> bool:
        limit = SHADOW_MAX_FLOAT_NUMEL if x.is_floating_point() else SHADOW_MAX_NUMEL
        return x.numel() <= limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._fused_sdp_choice.default:
            return self._sdp_choice(func, args, kwargs)
        tensors = tensors_of(args, kwargs)
        if not self.enabled or (tensors and not all(self._known(x) for x in tensors)):
            # Fast path: nothing to shadow; only forget a shadow an in-place op overwrites.
            out = func(*args, **kwargs)
            if tensors:
                self._forget_written(func, args)
            return out
        known = self.enabled and all(self._known(x) for x in tensors)
        if func in _SCALAR_OPS and tensors and known:
            return self._run_real(func, args, kwargs)
        random = torch.Tag.nondeterministic_seeded in func.tags
        want = known and not random and all(self._small(x) for x in tensors)
        try:
            out = func(*args, **kwargs)
        except (torch._subclasses.fake_tensor.DynamicOutputShapeException,
                torch._subclasses.fake_tensor.DataDependentOutputException):
            if not (want and tensors):
                raise
            real = self._run_real(func, args, kwargs)
            return tree_map(lambda r: self.real(r) if isinstance(r, torch.Tensor) else r, real)
        outs = tensors_of((out,))
        if want and all(self._small(o) for o in outs):
            real = self._run_real(func, args, kwargs)
            for o, r in zip(outs, tensors_of((real,))):
                if isinstance(o, FakeTensor) and isinstance(r, torch.Tensor) and self._small(r):
                    self.shadow[o] = r
        elif tensors:
            self._forget_written(func, args)
        return out

    def _forget_written(self, func, args) -> None:
        """An in-place or out= op writing an unknown value into a shadowed tensor: forget it."""
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and i < len(args):
                t = args[i]
                if isinstance(t, FakeTensor) and t in self.shadow:
                    del self.shadow[t]

    def _sdp_choice(self, func, args, kwargs):
        """sdpa's kernel choice as a real tensor of these shapes would get it. The fake answer is
        always the math kernel, which saves the (B, H, T, T) attention weights for backward; the
        real CPU run takes the flash kernel (as CUDA takes flash / memory-efficient), which saves
        only the output and log-sum-exp."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        def empty(x):
            if not isinstance(x, FakeTensor):
                return x
            t = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype)
            return t.requires_grad_(x.requires_grad) if x.is_floating_point() else t

        with unset_fake_temporarily():
            return func(*[empty(a) for a in args], **{k: empty(v) for k, v in kwargs.items()})

    def _to_real(self, x):
        return self.shadow[x] if isinstance(x, FakeTensor) else x

    def _run_real(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return func(*tree_map(self._to_real, args), **tree_map(self._to_real, kwargs))


@contextlib.contextmanager
def fake_mode():
    """(FakeTensorMode, Shadowed) active together; CPU fake tensors (a CPU torch build refuses
    fake CUDA tensors: byte sizes are the same)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import transformers.masking_utils as mu

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    sh = Shadowed(fm)
    # transformers treats every fake tensor as "tracing" and then never skips the causal mask
    # (a real unpadded batch gets mask None and sdpa's is_causal): a shadowed fake has its values,
    # so the mask logic may read them as in the real run.
    real_is_tracing = mu.is_tracing

    def is_tracing(tensor=None):
        return real_is_tracing(None if isinstance(tensor, FakeTensor) and tensor in sh.shadow else tensor)

    # torch.tensor([t0, t1, ...]) of 0-d tensors reads their data directly, with no dispatch
    # (Qwen2.5-VL's get_rope_index builds its position deltas so): give it the shadows' values.
    real_tensor = torch.tensor

    def tensor(data, *a, **k):
        if isinstance(data, (list, tuple)) and any(isinstance(x, FakeTensor) for x in data):
            data = [sh.shadow[x] if isinstance(x, FakeTensor) and x in sh.shadow else x for x in data]
        return real_tensor(data, *a, **k)

    mu.is_tracing, torch.tensor = is_tracing, tensor
    try:
        with fm, sh:
            yield fm, sh
    finally:
        mu.is_tracing, torch.tensor = real_is_tracing, real_tensor
