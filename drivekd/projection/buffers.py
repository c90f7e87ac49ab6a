"""Per-loss gradient rows for the projection: a K x N buffer that autograd writes into directly.

While loss k's backward runs, every trainable parameter's ``.grad`` is a view into row k of the
buffer. Autograd accumulates into an existing ``.grad`` in place, so the gradient lands in the row
with no transient copy ("view" path). That needs ``.grad`` to have the parameter's dtype, so a
buffer of another dtype (e.g. a bf16 buffer, half the memory, for fp32 parameters) takes the
"copy" path: ``.grad`` starts as None, autograd allocates it, and it is cast into the row after the
backward (one transient gradient set per backward).

The optimiser's own gradients are a separate flat (N,) vector in the parameters' dtype, allocated
on first use; each parameter's real ``.grad`` is a view into it, so the combined gradient is added
with one in-place add (or directly by ``combine(..., accumulate_into=...)``).

Typical micro-step::

    bufs.zero_()
    for k in active_rows:
        bufs.backward(k, weighted_loss[k], retain_graph=k != active_rows[-1])
    info = bufs.combine_into_params("agp", order)   # or accumulate_into_params(vec)
    log(bufs.stats(info))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from drivekd.projection.combine import combine, gram

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
        self.param_grads: torch.Tensor | None = None  # the optimiser's flat gradients, on first use
        self._grad_views: list[torch.Tensor] | None = None

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

    # ------------------------------------------------------------------ the optimiser's gradients

    def _install_param_grads(self) -> torch.Tensor:
        """Point every parameter's ``.grad`` at its slice of the flat optimiser gradient.

        A ``.grad`` that is None (``zero_grad(set_to_none=True)``) makes its slice zero; any other
        tensor found there is copied in first, so nothing the optimiser sees is lost.
        """
        if self.param_grads is None:
            self.param_grads = torch.zeros(self.numel, dtype=self.param_dtype, device=self.device)
            self._grad_views = self._views(self.param_grads)
        for i, (p, v) in enumerate(zip(self.params, self._grad_views)):
            g = p.grad
            if g is not None and g.data_ptr() == v.data_ptr() and g.shape == v.shape:
                continue
            sl = self.param_grads[self.offsets[i] : self.offsets[i + 1]]
            if g is None:
                sl.zero_()
            else:
                sl.copy_(g.detach().reshape(-1))
            p.grad = v
        return self.param_grads

    def accumulate_into_params(self, vec: torch.Tensor) -> None:
        """Add a combined (N,) gradient into the parameters' real ``.grad`` (accumulating)."""
        if not isinstance(vec, torch.Tensor) or vec.shape != (self.numel,):
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"vec must have shape ({self.numel},), got {shape}")
        self._install_param_grads().add_(vec.to(self.device))

    def combine_into_params(
        self,
        method: str,
        order: Sequence[int] | None = None,
        eps: float = 1e-12,
        *,
        return_info: bool = True,
    ) -> dict | None:
        """combine() the filled rows and add the result into the parameters' ``.grad``.

        Unfilled rows are passed as inactive (``active=self.filled``): a skipped loss is absent,
        not a zero gradient (a zero row would still make AGP add one more copy of g_sup). No
        N-vector is allocated when the buffer and parameters are fp32.
        """
        if not any(self._filled):
            raise ValueError("no row was filled this micro-step: call backward(k, loss) first")
        target = self._install_param_grads()
        out_dtype = torch.float64 if self.buffer.dtype == torch.float64 else torch.float32
        kwargs = dict(active=self._filled, return_info=return_info)
        if target.dtype == out_dtype:
            res = combine(self.buffer, method, order, eps, accumulate_into=target, **kwargs)
        else:
            res = combine(self.buffer, method, order, eps, **kwargs)
            target.add_((res[0] if return_info else res).to(target.dtype))
        return res[1] if return_info else None

    # ------------------------------------------------------------------ diagnostics

    def stats(self, info: dict | None = None) -> dict[str, torch.Tensor]:
        """Row norms and pairwise cosines, from ``info["gram"]`` of combine(return_info=True) when
        given (free), else from one Gram pass over the buffer. Tensors on the buffer's device.

        Returns {"gram": (K, K), "norms": (K,), "cosine": (K, K) (0 where a norm is 0),
        "filled": (K,) bool, and "fired" when ``info`` is given}.
        """
        G = info["gram"] if info is not None else gram(self.buffer)
        norms = G.diagonal().clamp_min(0.0).sqrt()
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, G / denom.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(G))
        out = {
            "gram": G,
            "norms": norms,
            "cosine": cos,
            "filled": torch.tensor(self._filled, dtype=torch.bool),
        }
        if info is not None:
            out["fired"] = info["fired"]
        return out
