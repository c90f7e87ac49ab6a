"""Gram engine: AGP / G1 / G2 / none without K full gradient rows.

Every vector the projection builds is a linear combination of the K per-loss gradients, so the
update is d/dparams of sum_k lambda_k * loss_k, with lambda a function of the K x K Gram matrix
alone (``coefficients``). The rows engine (``GradBuffers`` + ``combine``) holds K gradient rows of
N parameters each (K x N x 4 bytes: 16 bytes/parameter at K = 4). This engine holds none:

1. ``gram(losses)``: ONE K-batched backward, ``torch.vmap`` over the K one-hot grad_outputs of
   ``autograd.grad(stack(losses), params, retain_graph=True)``. Each parameter's gradient arrives
   complete (every use summed by autograd: tied embeddings get their cross-terms) as a (K, *shape)
   block in a tensor hook; the hook folds block @ block.T into the Gram (``combine.gram``: fp32
   products, fp64 sums) and hands autograd back a stride-0 zero, so the block dies right there.
   Transient memory: K x the largest parameter, plus K x the activation gradients of one point of
   the backward (the batched backward carries K gradients through the graph at once).
   The backward batches for real: ops torch ships without a batching rule get one
   (``vmap_rules.py``: CPU flash-sdpa backward, masked_scatter backward), the capture's backward
   uses batchable ops; any op still looped over K is recorded in ``fallbacks``. With ``cut``
   (TrainStep cuts the forward at the input of the first decoder layer above the deepest loss
   layer, or at the LM head's), the losses that read the top (CE, KL) are backpropagated through
   it first, batched over those losses only, and the K-batched backward starts below it: the
   upper layers and the vocabulary matmuls (the step's largest) run once per reading loss, not
   K-wide with zero rows.
2. ``coefficients(G, method, order, active=...)`` (combine.py): lambda (K,).
3. ``backward(losses, lam)``: one ordinary backward of sum_k lambda_k * loss_k, accumulating into
   the parameters' ``.grad`` (e.g. the loop's flat fp32 gradient views).

Why this design (measured in tools/bench_gram.py; see the report there):
* torchjd's autogram engine gets a Gramian module by module: identity nodes after each module with
  parameters, a vmapped backward targeted at those nodes, and per-module Jacobians recomputed in
  the nodes. It misses the cross-terms of a parameter shared by two modules (the tied embedding /
  LM head of small Qwen2.5 students), needs every module to own its parameters, and re-runs module
  forwards. Hooking the parameters themselves lets autograd do the summing over uses, and reuses
  the one backward graph (so gradient checkpointing, autocast and the capture's attention function
  work unchanged: they are just ops in the graph; custom autograd.Functions' Python backward runs
  under vmap like any other op, ops without a batching rule fall back to a loop over K).
* Per-parameter hooks on K sequential backwards cannot give the cross-terms <g_i, g_j> without
  holding the earlier rows, i.e. the rows engine again.
Cost: below the cut the batched backward does K backwards' work (a loss that stops at layer 0
still carries zeros up to the cut; above it only the |S| losses that read the top run), plus one
more backward for the update; the rows engine does the K backwards only as deep as each loss
reaches.

Data parallel (torchrun): the projection must see the Gram of the rank-AVERAGED gradients,
cross-rank terms included. Pass ``reduce``: called on each (K, n) block before it is folded, in
place, e.g. ``lambda b: (dist.all_reduce(b), b.div_(world))``. Blocks arrive in autograd's
completion order, which is the same on every rank when every rank runs the same model graph with
the same active losses: pass the globally active rows on every rank (a row with zero weight on
this rank's samples still runs, giving zeros). After ``backward``, the parameters' ``.grad`` hold
this rank's part: average them across ranks once per optimizer step (as the loop's fast path does).

Call sequence in one micro-step (inside the ``capture_attention`` block, where the forward ran)::

    engine = GramEngine(params, reduce=None)           # once, at trainer set-up
    ...
    weighted = [w[r] * losses[r] for r in range(K)]    # scalar losses of one forward
    G = engine.gram(weighted, active)                  # (K, K) fp64; graph retained
    lam, info = coefficients(G, method, order, active=active, return_info=True)
    engine.backward(weighted, lam)                     # += into p.grad; frees the graph
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from drivekd.projection import vmap_rules  # noqa: F401 - registers batching rules for the backward's ops
from drivekd.projection.combine import gram as _row_gram

__all__ = ["GramEngine"]

# functorch's warning for an op without a batching rule ("... the batching rule for aten::addcmul_. Please ...").
_FALLBACK = re.compile(r"not yet implemented the batching rule for (\S+?)\.? ")


class _Acc:
    """Mutable holder passed through autograd.Function.apply (lists/dicts would be pytree-copied)."""

    def __init__(self, K: int, device: torch.device, reduce: Callable[[torch.Tensor], object] | None,
                 hold: set[int] | None = None):
        self.G = torch.zeros(K, K, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
        self.reduce = reduce
        self.blocks = 0
        # id(param) -> {row: (n,) gradient}: parts of a row's gradient computed before the batched
        # backward (the top of a cut, see GramEngine.gram), added in before the block is folded.
        self.extra: dict[int, dict[int, torch.Tensor]] = {}
        # ids of the parameters whose blocks are held in `extra` instead of folded (stage 1 of a
        # cut: the parameters stage 2 reaches as well).
        self.hold = hold or set()

    def fold(self, block: torch.Tensor, key: int | None = None) -> None:
        """block (K, n): one parameter's K gradients, rows contiguous."""
        if key in self.hold:
            self.extra[key] = dict(enumerate(block))  # rows of a fresh (K, n) block: views, no copy
            return
        for r, g in self.extra.pop(key, {}).items():
            block[r] += g
        if self.reduce is not None:
            self.reduce(block)
        self.G += _row_gram(block).to(self.G.dtype)
        self.blocks += 1

    def fold_inner(self, x: torch.Tensor, d: int, key: int) -> None:
        """x: one parameter's K gradients as autograd made them, contiguous, the K rows along dim
        d > 0 (e.g. an embedding's (V, K, D)). Folded as the (O, K, I) view it already is (O, I:
        the sizes before / after d): the sum over O of each (K, I) slice's Gram, chunk by chunk.
        Moving the rows to the front would copy the whole K x n block (the input embedding's
        K x V x D: the step's largest temporary)."""
        if key in self.hold:
            self.fold(x.movedim(d, 0).reshape(x.shape[d], -1).contiguous(), key)
            return
        K = x.shape[d]
        for r, g in self.extra.pop(key, {}).items():
            x.select(d, r).add_(g.view(x.select(d, r).shape))
        if self.reduce is not None:
            self.reduce(x)
        X = x.view(-1, K, x[(0,) * d].numel() // K)  # (O, K, I), no copy
        step = max(1, (1 << 22) // max(1, K * X.shape[2]))  # ~16 MB of rows per chunk
        for o in range(0, X.shape[0], step):
            part = X[o : o + step]
            part = part if part.dtype in (torch.float32, torch.float64) else part.float()
            self.G += torch.bmm(part, part.transpose(1, 2)).sum(0, dtype=self.G.dtype)  # fp32 products, fp64 sums
        self.blocks += 1


class _FoldGram(torch.autograd.Function):
    """Identity-shaped sink for a parameter's gradient: under the engine's vmap, its ``vmap`` rule
    sees the whole (K, *shape) batch, folds it into the Gram and returns a stride-0 zero."""

    @staticmethod
    def forward(grad: torch.Tensor, acc: _Acc, key: int) -> torch.Tensor:
        # Only reached outside vmap (K = 1 would still go through vmap): fold a 1-row block.
        acc.fold(grad.detach().reshape(1, -1).contiguous(), key)
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def vmap(info, in_dims, grad: torch.Tensor, acc: _Acc, key: int):
        d = in_dims[0]
        if d is None:  # the same gradient for every loss (no batched input reached it)
            block = grad.reshape(1, -1).expand(info.batch_size, -1).contiguous()
            shape = grad.shape
        elif d > 0 and grad.is_contiguous():  # rows inside (an embedding's (V, K, D)): folded in place
            acc.fold_inner(grad, d, key)
            shape = grad.shape[:d] + grad.shape[d + 1 :]
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(shape), None
        else:
            block = grad.movedim(d, 0).reshape(info.batch_size, -1).contiguous()  # (K, n)
            shape = grad.shape[:d] + grad.shape[d + 1 :]
        acc.fold(block, key)
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(shape), None


class GramEngine:
    """Gram of K per-loss gradients by one K-batched backward, then one backward of the lambda-sum.

    Args:
        params: the parameters to differentiate (frozen ones, requires_grad=False, are skipped);
            each once (a tied weight is one Parameter).
        reduce: data parallel: called in place on each parameter's (K, n) gradient block before it
            is folded into the Gram (all-reduce mean across ranks). None in a single process.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, reduce: Callable[[torch.Tensor], object] | None = None):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("GramEngine got no trainable parameter (all have requires_grad=False)")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GramEngine got the same parameter twice; pass each parameter once")
        self.params = params
        self.device = params[0].device
        self.reduce = reduce
        self.last_blocks = 0  # parameters folded by the last gram() (diagnostics, tests)
        self.fallbacks: set[str] = set()  # ops that ran as a loop over K under vmap (no batching rule), e.g. "aten::addcmul_"

    def gram(self, losses: Sequence[torch.Tensor | None], active: Sequence[bool] | torch.Tensor | None = None,
             cut: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(K, K) fp64 Gram of the gradients of ``losses`` (scalars of one forward), graph retained.

        Row/column k is zero for an inactive row (``active[k]`` False, or ``losses[k]`` None) and
        for a loss that does not require grad (it is still part of the batch, so every rank folds
        blocks of the same shape). Parameters no active loss reaches contribute nothing.

        ``cut`` = (h, leaf): the forward cut its graph at h (B x T x D: TrainStep cuts at the input
        of the first decoder layer above the deepest loss layer, or at the LM head's input): the
        model above ran on ``leaf = h.detach().requires_grad_()``. In two stages:
        1. the top: the losses that reach leaf (CE, KL; S below, found by walking the graph) are
           backpropagated batched over S only (|S| = 1: a plain backward) to leaf and the
           parameters, their blocks folded by the same hooks, giving dL_S/dh (|S| x h);
        2. the bottom: the K-batched backward starts at h with the S rows' dL/dh (zero in the
           other rows) and at the other losses.
        Exact for any cut (every path is summed once: a path not through leaf is in stage 1's
        gradients; parameters stage 2 reaches too, the tied embedding, have their stage-1 rows
        held and added into their stage-2 block); the cut only decides the speed: the layers above
        it and the head (the vocabulary matmuls, the step's largest) run |S| times instead of K (a
        K-batched backward through them carries K - |S| rows of zeros). Holds |S| x the
        parameters both stages reach (the tied embedding) until their block is folded.
        """
        K = len(losses)
        act = _active(active, K)
        rows = [k for k in range(K) if act[k] and losses[k] is not None]
        acc = _Acc(K, self.device, self.reduce)
        if not rows:
            return acc.G
        for k in rows:
            if not isinstance(losses[k], torch.Tensor) or losses[k].numel() != 1:
                raise ValueError(f"loss {k} must be a scalar tensor, got {type(losses[k]).__name__}")
        rows = [k for k in rows if losses[k].requires_grad]
        if not rows:
            return acc.G
        sub = _Acc(len(rows), self.device, self.reduce)
        reads = _reads_cut(losses, rows, cut)  # positions in `rows` of the losses that reach the cut's leaf
        rest = [i for i in range(len(rows)) if i not in reads]
        blocks = 0
        dH = None
        if reads:
            h, leaf = cut
            # Parameters stage 2 reaches (the tied embedding): their S rows are held, not folded.
            below = _leaves_reached([losses[rows[i]] for i in rest] + [h])
            top = _Acc(len(reads), self.device, self.reduce, hold=below)
            S = torch.stack([losses[rows[i]].reshape(()).float() for i in reads])  # (|S|,)

            def upper(go):  # go: one-hot (|S|,) -> dL/dleaf of that row; the parameters' blocks folded by the hooks
                g = torch.autograd.grad(S, [leaf, *self.params], go, retain_graph=True, allow_unused=True)[0]
                return g if g is not None else torch.zeros_like(leaf)

            dH = self._folded(upper, len(reads), top).to(h.dtype)  # (|S|, *h.shape)
            ix = torch.tensor(reads, dtype=torch.long, device=self.device)
            sub.G[ix[:, None], ix[None, :]] += top.G
            for key, part in top.extra.items():  # held rows, renumbered to positions in `rows`
                sub.extra[key] = {reads[j]: g for j, g in part.items()}
            blocks = top.blocks
            del top
        L = torch.stack([losses[rows[i]].reshape(()).float() for i in rest]) if rest else None  # (K'-|S|,)
        reads_t = torch.tensor(reads, dtype=torch.long, device=self.device)
        rest_t = torch.tensor(rest, dtype=torch.long, device=self.device)

        def batched(go):  # go: one-hot (K',) -> every parameter's gradient of row go, folded by the hooks
            outs, gos = [], []
            if L is not None:
                outs.append(L)
                gos.append(go.index_select(0, rest_t))
            if dH is not None:
                outs.append(cut[0])
                gos.append(torch.tensordot(go.index_select(0, reads_t).to(dH.dtype), dH, dims=1))
            torch.autograd.grad(outs, self.params, gos, retain_graph=True, allow_unused=True)  # zeros (the hooks folded)
            return go[:1]  # vmap needs a tensor out

        self._folded(batched, len(rows), sub)
        # Held rows stage 2 never reached (none when the graph walk is right): their rows alone,
        # in parameter order (the same on every rank).
        for p in self.params:
            if id(p) in sub.extra:
                _fold_rows(sub, p, self.device)
        self.last_blocks = blocks + sub.blocks
        idx = torch.tensor(rows, device=self.device)
        acc.G[idx[:, None], idx[None, :]] = sub.G
        return acc.G

    def _folded(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int, acc: _Acc) -> torch.Tensor:
        """fn(one-hot (n,)) batched over the n rows (torch.vmap; n = 1: called once, unbatched),
        with every parameter's gradient block folded into ``acc`` by a hook. Returns fn's (n, ...)."""
        handles = [p.register_hook(lambda g, _a=acc, _k=id(p): _FoldGram.apply(g, _a, _k)) for p in self.params]
        eye = torch.eye(n, dtype=torch.float32, device=self.device)
        try:
            with warnings.catch_warnings(record=True) as seen:
                # An op without a vmap batching rule falls back to a loop over the K losses
                # (correct, but per-op overhead and no batched kernel): recorded by name in
                # self.fallbacks (tools/bench_gram.py lists them; tests/test_gram_engine.py
                # fails on any on the tiny students' path) instead of warning at every step.
                warnings.simplefilter("always")
                out = fn(eye[0]).unsqueeze(0) if n == 1 else torch.vmap(fn)(eye)
        finally:
            for hd in handles:
                hd.remove()
        for w in seen:
            m = _FALLBACK.search(str(w.message))
            if m:
                self.fallbacks.add(m.group(1))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out

    def backward(self, losses: Sequence[torch.Tensor | None], lam: torch.Tensor | Sequence[float], *, retain_graph: bool = False,
                 cut: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """p.grad += d/dp sum_k lam[k] * losses[k] (rows with lam 0, None or no grad skipped).
        ``cut``: as in ``gram`` (the losses that reach the cut go through the top first, then on from h)."""
        K = len(losses)
        lam = torch.as_tensor(lam).detach()
        if lam.shape != (K,):
            raise ValueError(f"lam must hold one coefficient per loss (K={K}), got shape {tuple(lam.shape)}")
        ks = [k for k in range(K) if isinstance(losses[k], torch.Tensor) and losses[k].requires_grad]
        reads = {ks[i] for i in _reads_cut(losses, ks, cut)}
        terms, top_terms = [], []
        for k in ks:
            c = lam[k].to(device=losses[k].device, dtype=torch.float32)
            (top_terms if k in reads else terms).append(c * losses[k].reshape(()).float())
        outs, gos = [], []
        if top_terms:
            h, leaf = cut
            # Into p.grad directly (no top-sized temporary), and dL/dh into leaf.grad.
            leaf.grad = None
            torch.autograd.backward(torch.stack(top_terms).sum(), inputs=[leaf, *self.params], retain_graph=True)
            if leaf.grad is not None:
                outs.append(h)
                gos.append(leaf.grad.to(h.dtype))
                leaf.grad = None
        if terms:
            outs.append(torch.stack(terms).sum())
            gos.append(None)
        if outs:
            torch.autograd.backward(outs, gos, inputs=self.params, retain_graph=retain_graph)


def _fold_rows(acc: _Acc, p: torch.Tensor, device) -> None:
    """Fold the top's rows held for ``p`` alone (its other rows are zero): a (|S|, n) block."""
    part = acc.extra.pop(id(p))  # {position: (n,)}
    pos = sorted(part)
    block = part[pos[0]].view(1, -1) if len(pos) == 1 else torch.stack([part[i] for i in pos])  # no copy for one row
    del part
    if acc.reduce is not None:
        acc.reduce(block)
    ix = torch.tensor(pos, device=device)
    acc.G[ix[:, None], ix[None, :]] += _row_gram(block).to(acc.G.dtype)
    acc.blocks += 1


def _leaves_reached(roots: list[torch.Tensor]) -> set[int]:
    """ids of the leaf tensors (parameters) the graphs of ``roots`` reach."""
    stack, seen, out = [r.grad_fn for r in roots], set(), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        v = getattr(fn, "variable", None)
        if v is not None:
            out.add(id(v))
        stack.extend(f for f, _ in fn.next_functions)
    return out


def _reads_cut(losses, rows: list[int], cut) -> list[int]:
    """Positions i in ``rows`` whose loss's graph reaches ``cut``'s leaf (walks grad_fn edges)."""
    if cut is None:
        return []
    leaf = cut[1]
    if not leaf.requires_grad:
        return []
    out = []
    for i, k in enumerate(rows):
        stack, seen = [losses[k].grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if getattr(fn, "variable", None) is leaf:
                out.append(i)
                break
            stack.extend(f for f, _ in fn.next_functions)
    return out


def _active(active, K: int) -> list[bool]:
    if active is None:
        return [True] * K
    act = active.tolist() if isinstance(active, torch.Tensor) else list(active)
    if len(act) != K:
        raise ValueError(f"active must hold one boolean per loss (K={K}), got {len(act)}")
    return [bool(a) for a in act]
