"""vmap batching rules for the ops on the students' backward that torch ships without one.

The Gram engine runs ONE backward vmapped over K one-hot grad_outputs (gram_engine.py). An op
without a batching rule falls back to a Python-level loop over K (functorch's
"performance drop" warning): correct, but K kernel calls plus stacking. Two such ops sit on the
students' CPU path (found by tools/bench_gram.py --proxy, which lists what still falls back):

* ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` (every sdpa layer, text and
  vision): the K gradients are folded into the kernel's own batch dimension, one call of
  (K*B, H, T, D); the other inputs (q, k, v, out, logsumexp: saved, unbatched) are expanded to it
  (a K-fold copy of one layer's q/k/v/out, T x H x D floats each: ~6 MB at InternVL3-1B's text width).
* ``aten::masked_scatter_backward`` (the image-token merge of both families,
  ``inputs_embeds.masked_scatter(image_mask, image_features)``): the source's gradient is the
  masked positions of the incoming gradient, in order: an index_select with the mask's (unbatched)
  flat indices, an op with a batching rule.

Both rules compute what the loop would (the same kernel on the same numbers, or a gather of the
same elements): exact. They are registered once, on import, for the FuncTorchBatched key, which
only vmap reaches: outside vmap nothing changes. (The capture's own backward,
families/capture.py, is written with batchable ops instead.)
"""

from __future__ import annotations

import torch
import torch._C._functorch as _ft

_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def _level(*args) -> int:
    """The vmap level of the batched tensors among ``args`` (they must share one)."""
    levels = {_ft.maybe_get_level(a) for a in args if isinstance(a, torch.Tensor) and _ft.is_batchedtensor(a)}
    if len(levels) != 1:
        raise NotImplementedError(f"drivekd's vmap rule expects tensors batched at one vmap level, got levels {sorted(levels)}")
    return levels.pop()


def _physical(x: torch.Tensor | None, level: int, K: int) -> torch.Tensor | None:
    """x as a plain tensor with the vmap dimension first: unwrapped and moved, or expanded K-fold."""
    if x is None:
        return None
    if _ft.is_batchedtensor(x) and _ft.maybe_get_level(x) == level:
        return _ft.get_unwrapped(x).movedim(_ft.maybe_get_bdim(x), 0)
    return x.unsqueeze(0).expand(K, *x.shape)


def _batch_size(args, level: int) -> int:
    for a in args:
        if isinstance(a, torch.Tensor) and _ft.is_batchedtensor(a) and _ft.maybe_get_level(a) == level:
            return _ft.get_unwrapped(a).shape[_ft.maybe_get_bdim(a)]
    raise AssertionError("no batched input")


def _flash_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=None, scale=None):
    tensors = (grad_out, query, key, value, out, logsumexp, attn_mask)
    level = _level(*tensors)
    K = _batch_size(tensors, level)
    B = query.shape[0]  # logical (per-vmap-entry) batch

    def fold(x):  # (K, B, ...) -> (K*B, ...): the vmap dimension joins the kernel's batch
        if x is None:
            return None
        p = _physical(x, level, K)
        if p.shape[1] != B:  # a mask broadcast over the batch (1, ...): materialise it per entry
            p = p.expand(K, B, *p.shape[2:])
        return p.reshape(K * B, *p.shape[2:])

    with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            fold(grad_out), fold(query), fold(key), fold(value), fold(out), fold(logsumexp), dropout_p, is_causal,
            attn_mask=fold(attn_mask), scale=scale)
    return tuple(_ft._add_batch_dim(g.reshape(K, B, *g.shape[1:]), 0, level) for g in (gq, gk, gv))


def _masked_scatter_backward(grad, mask, sizes):
    if _ft.is_batchedtensor(mask):
        raise NotImplementedError("drivekd's masked_scatter_backward vmap rule expects an unbatched mask")
    # Composite: ops with batching rules, on the batched grad. The mask is unbatched (the same
    # image positions for every one of the K gradients).
    idx = mask.expand(grad.shape).reshape(-1).nonzero().squeeze(1)
    n = 1
    for s in sizes:
        n *= int(s)
    picked = grad.reshape(-1).index_select(0, idx)  # the masked elements in order, as masked_select
    if idx.numel() < n:  # a source larger than the mask: its unused tail gets zero gradient (as aten)
        picked = torch.cat([picked, picked.new_zeros(n - idx.numel())])
    return picked.reshape(sizes)


_LIB = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - kept alive: the registration lives as long as it
_LIB.impl("_scaled_dot_product_flash_attention_for_cpu_backward", _flash_cpu_backward, "FuncTorchBatched")
_LIB.impl("masked_scatter_backward", _masked_scatter_backward, "FuncTorchBatched")
