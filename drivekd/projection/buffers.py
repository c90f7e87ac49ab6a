"""Per-loss gradient rows for the projection: a K x N buffer that autograd writes into directly.

While loss k's backward runs, every trainable parameter's ``.grad`` is a view into row k of the
buffer. Autograd accumulates into an existing ``.grad`` in place, so the gradient lands in the row
with no transient copy ("view" path). That needs ``.grad`` to have the parameter's dtype, so a
buffer of another dtype (e.g. a bf16 buffer, half the memory, for fp32 parameters) takes the
"copy" path: ``.grad`` starts as None, autograd allocates it, and it is cast into the row after the
backward (one transient gradient set per backward).

The parameters' own ``.grad`` (the optimiser's gradients, e.g. the loop's flat fp32 views) are
saved before and restored after each backward; the combined gradient is added to them with
``combine(bufs.buffer, ..., active=bufs.filled, accumulate_into=flat)``.

Typical micro-step::

    bufs.zero_()
    for k in active_rows:
        bufs.backward(k, weighted_loss[k], retain_graph=k != active_rows[-1])
    combine(bufs.buffer, "agp", order, active=bufs.filled, accumulate_into=flat_grads)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


__all__ = ["GradBuffers"]


class GradBuffers:
    """K gradient rows over a list of parameters (frozen ones, requires_grad=False, are skipped).

    Args:
        params: the parameters (e.g. ``model.parameters()``); trainable ones must share one device
            and one dtype.
        num_rows: K, one row per loss (row 0 = CE, then the teacher terms).
        dtype: the buffer's dtype; fp32, or bf16 to halve its memory.
        mode: "auto" (view path when ``dtype`` equals the parameters' dtype, else copy path),
            "view" (error if the dtypes differ) or "copy".
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        num_rows: int,
        dtype: torch.dtype = torch.float32,
        *,
        mode: str = "auto",
    ):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("GradBuffers got no trainable parameter (all have requires_grad=False)")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GradBuffers got the same parameter twice; pass each parameter once")
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if len(devices) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"trainable parameters must share one device and one dtype, got devices "
                f"{sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}"
            )
        if int(num_rows) < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if mode not in ("auto", "view", "copy"):
            raise ValueError(f"mode must be 'auto', 'view' or 'copy', got {mode!r}")
        self.param_dtype = params[0].dtype
        if mode == "view" and dtype != self.param_dtype:
            raise ValueError(
                f"mode='view' needs the buffer dtype to equal the parameters' dtype ({self.param_dtype}), "
                f"got {dtype}: use mode='copy' (or 'auto') for a {dtype} buffer"
            )
        self.mode = ("view" if dtype == self.param_dtype else "copy") if mode == "auto" else mode
        self.params = params
        self.device = params[0].device
        self.num_rows = int(num_rows)
        self.numels = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self.buffer = torch.zeros(self.num_rows, self.numel, dtype=dtype, device=self.device)
        self._row_views = [self._views(self.buffer[k]) for k in range(self.num_rows)] if self.mode == "view" else None
        self._filled = [False] * self.num_rows
        self._dirty = [False] * self.num_rows  # row holds non-zero data

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + n].view_as(p) for p, o, n in zip(self.params, self.offsets, self.numels)]

    @property
    def filled(self) -> tuple[bool, ...]:
        """Which rows received a backward since the last ``zero_()``; pass as ``combine(active=)``."""
        return tuple(self._filled)

    def zero_(self) -> None:
        """Start a micro-step: every row becomes zero and unfilled (only dirty rows are written)."""
        for k in range(self.num_rows):
            if self._dirty[k]:
                self.buffer[k].zero_()
                self._dirty[k] = False
            self._filled[k] = False

    def backward(self, k: int, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Row k := d loss / d params (overwriting row k). The parameters' ``.grad`` are left as found.

        A loss that does not reach some parameters leaves their slices of row k zero.
        """
        if not 0 <= k < self.num_rows:
            raise ValueError(f"row {k} out of range: the buffer has rows 0..{self.num_rows - 1}")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(
                f"the loss for row {k} does not require grad (detached, or a zero-weight term): "
                "skip its backward instead; the row then stays zero and unfilled"
            )
        row = self.buffer[k]
        if self._dirty[k]:
            row.zero_()
        self._dirty[k] = True  # from here on the row may hold data, even if backward raises
        saved = [p.grad for p in self.params]
        try:
            if self.mode == "view":
                for p, v in zip(self.params, self._row_views[k]):
                    p.grad = v
            else:
                for p in self.params:
                    p.grad = None
            loss.backward(retain_graph=retain_graph, inputs=self.params)
            for i, p in enumerate(self.params):
                g = p.grad
                if g is None:
                    continue
                # View path: autograd added in place, nothing to do. If something replaced the
                # view (e.g. create_graph=True makes autograd accumulate out of place), copy.
                if self.mode == "copy" or g.data_ptr() != self._row_views[k][i].data_ptr():
                    row[self.offsets[i] : self.offsets[i + 1]].copy_(g.detach().reshape(-1))
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        self._filled[k] = True
