"""Gradient-conflict handling on the Gram matrix of the per-loss gradient rows (METHOD.md section 6).

Every vector the projection methods build (merged gradients, projected gradients, their sums) is a
linear combination of the K raw rows of ``grads``. So we:

1. read the (K, N) buffer once to form the K x K Gram matrix G = B B^T (fp32 products, fp32 sums
   inside blocks of a few thousand columns, fp64 sums across blocks),
2. run the projection logic on K-long coefficient vectors c (the vector is c @ B, so
   <c @ B, d @ B> = c^T G d and ||c @ B||^2 = c^T G c), entirely as small tensors on the buffer's
   device (no ``.item()``, no host sync),
3. read the buffer a second time for ONE product lambda^T B (fp32 accumulation).

Two passes over the buffer instead of one pass per dot product and per projected vector, and no
per-parameter Python loop. Extra memory: none for fp32 rows with ``accumulate_into``, else the
output N-vector; bf16/fp16 rows add an fp32 upcast scratch (see :func:`combine`). The public entry
point is :func:`combine` (``drivekd.projection.combine`` is re-exported as the function: import
this module with ``importlib.import_module`` if you need it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

__all__ = ["METHODS", "MAX_ROWS", "coefficients", "combine", "gram"]

METHODS = ("agp", "g1", "g2", "none")
# Row 0 is the hard-label gradient, rows 1.. the teacher terms (perception, reasoning, planning).
MAX_ROWS = 4

# CPU: the Gram is one batched matmul over blocks of _CPU_BLOCK columns, (nb, K, c) x (nb, c, K),
# which torch parallelises over blocks; fp32 sums stay inside a block, the nb partial Grams are
# summed in fp64. A single (K x N) @ (N x K) sgemm is compute-bound (~3x slower) on this shape.
_CPU_BLOCK = 8192
# Half-precision rows are upcast to an fp32 scratch of at most _CPU_CHUNK (CPU: 2 MiB for K = 4,
# about one core's L2, measured best single-threaded) / _CUDA_CHUNK (64 MiB) columns at a time,
# and never more than one N-vector (see combine).
_HALF = (torch.bfloat16, torch.float16)
_CPU_CHUNK = 1 << 17
_CUDA_CHUNK = 1 << 22
_MIN_CHUNK = 4096


def combine(
    grads: torch.Tensor,
    method: str,
    order: Sequence[int] | torch.Tensor | None = None,
    eps: float = 1e-12,
    *,
    active: Sequence[bool] | torch.Tensor | None = None,
    return_info: bool = False,
    accumulate_into: torch.Tensor | None = None,
    zero_tol: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Combine per-loss gradient rows into one update direction.

    Args:
        grads: (K, N) tensor, 2 <= K <= 4. Row 0 is g_sup, the gradient of w_ce * CE; rows 1..K-1
            are g_k, the gradients of w_k * M[c, k] * L_k in teacher order (perception, reasoning,
            planning). fp32, fp64, bf16 or fp16.
        method: one of
            * ``"none"``: plain sum of the rows.
            * ``"agp"`` (Drive-KD): stage 1, asymmetric: m_k = g_sup + proj(g_k, g_sup), the anchor
              g_sup is never changed. Stage 2, symmetric and shuffled: for each i in the
              permutation, t_i = m_i, then t_i = proj(t_i, m_j) for each j != i in permutation
              order, always against the unprojected m_j. Result sum_i t_i, so g_sup is counted
              once per (active) teacher term, as in the released trainer.
            * ``"g1"``: one symmetric PCGrad pass over all rows: the permutation is row 0 followed
              by ``order``; for each i, t_i = g_i, then t_i = proj(t_i, g_j) for each j != i in
              permutation order against the unprojected g_j. Result sum_i t_i.
            * ``"g2"``: (our reading of the paper's one-line description) stage 1, symmetric inside
              each capability k: c_k = proj(g_sup, g_k) + proj(g_k, g_sup), i.e. the CE/teacher-k
              pair is PCGrad-ed both ways and merged into one vector; g_sup is thus counted once
              per teacher term, exactly as in AGP, so that G2 differs from AGP only in stage 1
              (symmetric instead of anchored). Stage 2 is AGP's stage 2 run on the c_k (same
              permutation). Result sum_k t_k.
            with proj(f, a) = f - min(0, <f, a>) / (||a||^2 + eps) * a.
        order: permutation of 1..K-1 for the shuffled stage (AGP/G2 stage 2, G1's order after
            row 0). ``None`` draws one with ``torch.randperm`` from torch's global CPU generator.
            Pass a list, not a CUDA tensor (a CUDA tensor costs one host sync to read).
        eps: the eps of proj's denominator.
        active: K booleans; a False row is treated as absent (its loss was skipped this
            micro-step): it takes part in no projection and contributes nothing, and AGP/G2 do not
            add a g_sup copy for it. An inactive row must still hold finite values (zeros): it is
            read with the others and multiplied by 0. ``None``: all rows active.
        return_info: also return ``info`` = {"gram": (K, K) fp64 Gram of the rows, "coef": (K,)
            fp64 lambda with result = lambda @ grads, "fired": int64 0-d tensor, number of
            projections that removed a conflicting component, "merged": (K-1, K) fp64
            coefficients of the stage-1 vectors m_k (AGP) / c_k (G2), else None, "order": the
            permutation used}. All tensors stay on the grads' device.
        accumulate_into: optional contiguous (N,) tensor of the result dtype on the grads' device;
            the result is added into it in place (no output N-vector is allocated) and it is
            returned. Extra memory then: 0 for fp32/fp64 rows, an fp32 upcast scratch of at most
            one N-vector (K x min(N/K, 2^17 on CPU, 2^22 on CUDA) floats) for bf16/fp16 rows.
            Without it: the output N-vector, plus at most N/16 floats of scratch for bf16/fp16.
        zero_tol: relative tolerance under which a combined vector counts as numerically zero
            (see ``_Space.norms``). ``None``: 1e-5 for a Gram from fp32/bf16/fp16 rows, 1e-12 for
            fp64.

    Returns:
        The combined (N,) gradient, fp32 for fp32/bf16/fp16 rows (the optimiser's gradients are
        fp32, and bf16 rounding of a sum of K rows would lose the small projected components),
        fp64 for fp64 rows. With ``return_info`` the tuple (vector, info).
    """
    K, N = _check_grads(grads)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    perm = _check_order(order, K)
    act = _check_active(active, K, grads.device)
    out_dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    if accumulate_into is not None:
        _check_out(accumulate_into, N, out_dtype, grads.device)

    # Half-precision rows are upcast chunk-wise into an fp32 scratch (K x chunk) of at most one
    # N-vector. With accumulate_into it serves both passes (extra memory: the scratch only);
    # otherwise it is freed before the output N-vector is allocated and the product pass uses one
    # of at most N/16 floats (peak extra <= 1 + 1/16 N-vectors).
    half = grads.dtype in _HALF
    need_gram = method != "none" or return_info
    scratch = _scratch(grads, N) if half and (need_gram or accumulate_into is not None) else None
    if need_gram:
        G = _gram(grads, scratch)
        if zero_tol is None:
            zero_tol = 1e-12 if grads.dtype == torch.float64 else 1e-5
        lam, info = coefficients(G, method, perm, eps, active=act, zero_tol=zero_tol, return_info=True)
        G, fired, merged = info["gram"], info["fired"], info["merged"]
    else:  # plain sum: no Gram needed, a single pass
        lam = act.to(out_dtype)
        G = fired = merged = None
    if half and accumulate_into is None:
        scratch = None  # free it first
        scratch = _scratch(grads, N // 16)
    vec = _product(grads, lam.to(out_dtype), accumulate_into, scratch)
    if not return_info:
        return vec
    info = {"gram": G, "coef": lam, "fired": fired, "merged": merged, "order": perm}
    return vec, info


def coefficients(
    gram: torch.Tensor,
    method: str,
    order: Sequence[int] | torch.Tensor | None = None,
    eps: float = 1e-12,
    *,
    active: Sequence[bool] | torch.Tensor | None = None,
    zero_tol: float = 1e-5,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """lambda (K,) with combine(B, method, ...) == lambda @ B, from the Gram matrix G = B B^T alone.

    The one place where AGP / G1 / G2 / none turn a Gram matrix into coefficients; ``combine``
    (rows engine: G from a K x N buffer) and ``GramEngine`` (G folded parameter by parameter, no
    rows held) both call it. Pure: no randomness when ``order`` is given, no host sync.

    Args:
        gram: (K, K) symmetric Gram matrix, 2 <= K <= 4, fp64 (as ``gram()`` returns) or fp32.
        method, order, eps, active: as in :func:`combine`.
        zero_tol: relative tolerance under which a combined vector counts as zero (see
            ``_Space.norms``): 1e-5 for a Gram of fp32/bf16/fp16 gradients (the default), 1e-12 for
            fp64 gradients.
        return_info: also return ``info`` as :func:`combine` does ({"gram", "coef", "fired",
            "merged", "order"}).

    Returns:
        lambda, fp64 (K,) on the Gram's device (fp32 on MPS), or (lambda, info).
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square (K, K) tensor, got {shape}")
    K = gram.shape[0]
    if not 2 <= K <= MAX_ROWS:
        raise ValueError(f"gram must be K x K with 2 <= K <= {MAX_ROWS} (CE + 1..{MAX_ROWS - 1} teacher terms), got K={K}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(zero_tol, (int, float)) and zero_tol >= 0.0):
        raise ValueError(f"zero_tol must be a number >= 0, got {zero_tol!r}")
    perm = _check_order(order, K)
    act = _check_active(active, K, gram.device)
    acc = torch.float64 if gram.device.type != "mps" else torch.float32
    G = gram.to(acc)
    lam, fired, merged = _coefficients(G, method, perm, eps, act, float(zero_tol))
    if not return_info:
        return lam
    return lam, {"gram": G, "coef": lam, "fired": fired, "merged": merged, "order": perm}


# --------------------------------------------------------------------------------------------
# Passes over the buffer


def gram(grads: torch.Tensor) -> torch.Tensor:
    """(K, K) fp64 Gram matrix of the rows of a (K, N) tensor, in one read pass.

    Products and sums inside a block are fp32 (bf16/fp16 rows are upcast chunk-wise, so their
    products are exact), partial Grams are summed in fp64. fp64 rows are handled in fp64. On CUDA
    one fp32 matmul (TF32 off) per chunk.
    """
    K, N = _check_grads(grads, max_rows=None)
    return _gram(grads, _scratch(grads, N) if grads.dtype in _HALF else None)


def _gram(grads: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    acc = torch.float64 if grads.device.type != "mps" else torch.float32
    if scratch is None:
        return _gram_full(grads, acc)
    K, N = grads.shape
    chunk = scratch.shape[1]
    G = torch.zeros(K, K, dtype=acc, device=grads.device)
    for s in range(0, N, chunk):
        w = min(chunk, N - s)
        S = scratch[:, :w]
        S.copy_(grads[:, s : s + w])
        G += _gram_full(S, acc)
    return G


def _gram_full(X: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Gram of fp32/fp64 rows X (K, n) (rows contiguous, any row stride), summed in ``acc``."""
    K, n = X.shape
    if X.device.type != "cpu":
        with _ieee_fp32_matmul():
            return (X @ X.T).to(acc)
    nb = n // _CPU_BLOCK
    G = torch.zeros(K, K, dtype=acc, device=X.device)
    if nb > 0:
        # (nb, K, c) view of the leading nb*c columns: blocks are batch entries (no copy).
        Xb = X[:, : nb * _CPU_BLOCK].unflatten(1, (nb, _CPU_BLOCK)).transpose(0, 1)
        G += torch.bmm(Xb, Xb.transpose(1, 2)).sum(0, dtype=acc)
    if nb * _CPU_BLOCK < n:
        T = X[:, nb * _CPU_BLOCK :]
        G += (T @ T.T).to(acc)
    return G


def _product(
    grads: torch.Tensor, lam: torch.Tensor, out: torch.Tensor | None, scratch: torch.Tensor | None
) -> torch.Tensor:
    """lam @ grads in fp32 (fp64 for fp64 rows), written into a new vector or added into ``out``;
    half-precision rows go through ``scratch`` (K, chunk) in lam's dtype."""
    K, N = grads.shape
    accumulate = out is not None
    if out is None:
        out = torch.empty(N, dtype=lam.dtype, device=grads.device)
    if scratch is None:
        _addmv(out, grads, lam, accumulate)
        return out
    chunk = scratch.shape[1]
    for s in range(0, N, chunk):
        w = min(chunk, N - s)
        S = scratch[:, :w]
        S.copy_(grads[:, s : s + w])
        _addmv(out[s : s + w], S, lam, accumulate)
    return out


def _addmv(out: torch.Tensor, X: torch.Tensor, lam: torch.Tensor, accumulate: bool) -> None:
    # X.T is (n, K) column-major; BLAS gemv reads each row of X once.
    if accumulate:
        out.addmv_(X.T, lam)
    else:
        torch.mv(X.T, lam, out=out)


def _scratch(grads: torch.Tensor, budget: int) -> torch.Tensor:
    """fp32 (K, chunk) upcast scratch holding at most ``budget`` floats (and at least one block)."""
    K, N = grads.shape
    cap = _CPU_CHUNK if grads.device.type == "cpu" else _CUDA_CHUNK
    chunk = max(1, min(N, cap, max(_MIN_CHUNK, budget // K)))
    return torch.empty(K, chunk, dtype=torch.float32, device=grads.device)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """CUDA fp32 matmul without TF32 for the Gram (TF32 keeps ~10 mantissa bits)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = False
        try:
            yield
        finally:
            m.allow_tf32 = old


# --------------------------------------------------------------------------------------------
# Projection logic on coefficient vectors


class _Space:
    """Vectors as rows of K coefficients over the gradient rows; inner products via the Gram.

    Methods work on R vectors at once, (R, K) coefficient matrices, so that one call does R
    independent projections (fewer, larger ops: ~20 small kernels per call on any R).
    """

    def __init__(self, G: torch.Tensor, eps: float, zero_tol: float):
        self.G = G
        self.diag = G.diagonal().clamp_min(0.0)
        self.eps = eps
        self.zero_tol = zero_tol
        self.fired = torch.zeros((), dtype=torch.int64, device=G.device)

    def norms(self, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||c @ B||^2 clamped at 0, is numerically zero) for each row c of C.

        A combined vector can be zero while its coefficients are not: in G2 with g_k = -s g_sup,
        c_k = proj(g_sup, g_k) + proj(g_k, g_sup) is 0 up to rounding with coefficients around
        (1 + s, 1 + 1/s); in AGP with g_sup = 0 and g_2 = -s g_1, stage 2 turns t_1 into ~0. Its
        squared norm from the Gram, c^T G c, is then rounding noise of the fp32 Gram entries
        (size ~ u * sum_i c_i^2 G_ii) and may be negative: dividing by it (+ eps) would turn noise
        into a huge coefficient, and lambda @ B would then amplify the rows' rounding. For full
        vectors, projecting onto a zero vector (or projecting a zero vector) is a no-op, so we
        treat c as zero when c^T G c <= zero_tol * sum_i c_i^2 G_ii, i.e. when its norm is below
        sqrt(zero_tol) (~3e-3 for fp32 Grams) of the norms of the rows it combines: the fp32 Gram
        cannot resolve such a vector's direction anyway. Exact zeros (c = 0, or zero rows) satisfy
        0 <= 0. Negative noise is clamped to 0 in the returned norm.
        """
        sq = ((C @ self.G) * C).sum(-1)
        scale = (C * C) @ self.diag
        return sq.clamp_min(0.0), sq <= self.zero_tol * scale

    def proj(
        self,
        F: torch.Tensor,
        A: torch.Tensor,
        a_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Row-wise proj(f, a) = f - min(0, <f, a>) / (||a||^2 + eps) * a.

        F (R, K); A (R, K) or (K,) (broadcast); ``a_norms`` precomputed norms(A); ``rows`` (R,)
        bool: rows left unchanged where False.
        """
        a_sq, a_zero = self.norms(A) if a_norms is None else a_norms
        _, f_zero = self.norms(F)
        d = ((F @ self.G) * A).sum(-1)
        conflict = (d < 0) & ~a_zero & ~f_zero
        if rows is not None:
            conflict = conflict & rows
        self.fired = self.fired + conflict.sum()
        coef = torch.where(conflict, d / (a_sq + self.eps), torch.zeros_like(d))
        return F - coef[:, None] * A


def _symmetric(space: _Space, V: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    """sum_i t_i, t_i = V[i] projected in turn against every unprojected V[j], j != i, in ``perm``
    order. All t_i advance together: step j projects every row except row j onto V[j], which
    gives each row exactly its sequence (perm without itself)."""
    R = V.shape[0]
    v_sq, v_zero = space.norms(V)
    others = ~torch.eye(R, dtype=torch.bool, device=V.device)
    T = V
    for j in perm:
        T = space.proj(T, V[j], (v_sq[j], v_zero[j]), rows=others[j])
    return T.sum(0)


def _coefficients(
    G: torch.Tensor,
    method: str,
    perm: tuple[int, ...],
    eps: float,
    act: torch.Tensor,
    zero_tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """lambda (K,) with result = lambda @ rows, the number of projections that fired, and the
    (K-1, K) stage-1 coefficients for AGP/G2 (None otherwise)."""
    K = G.shape[0]
    # Inactive rows must not reach the coefficient logic even as garbage (0 * inf = nan).
    G = torch.where(act[:, None] & act[None, :], G, torch.zeros_like(G))
    space = _Space(G, eps, zero_tol)
    a = act.to(G.dtype)
    E = torch.diag(a)  # row i = coefficients of g_i; zero for an absent row
    sup, followers = E[0], E[1:]  # (K,), (K-1, K)
    teacher_perm = [p - 1 for p in perm]  # row index in followers / merged
    merged = None
    if method == "none":
        lam = a.clone()
    elif method == "agp":
        # m_k = g_sup + proj(g_k, g_sup); zero for an absent teacher (no extra g_sup copy)
        merged = a[1:, None] * (sup + space.proj(followers, sup))
        lam = _symmetric(space, merged, teacher_perm)
    elif method == "g2":
        # c_k = proj(g_sup, g_k) + proj(g_k, g_sup)
        sups = sup.expand(K - 1, K)
        merged = a[1:, None] * (space.proj(sups, followers) + space.proj(followers, sup))
        lam = _symmetric(space, merged, teacher_perm)
    else:  # g1
        lam = _symmetric(space, E, (0, *perm))
    return lam, space.fired, merged


# --------------------------------------------------------------------------------------------
# Validation


def _check_grads(grads, max_rows: int | None = MAX_ROWS) -> tuple[int, int]:
    if not isinstance(grads, torch.Tensor):
        raise ValueError(f"grads must be a torch.Tensor of shape (K, N), got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must have shape (K, N), got shape {tuple(grads.shape)}")
    K, N = grads.shape
    if max_rows is not None and not 2 <= K <= max_rows:
        raise ValueError(
            f"grads must have 2 to {max_rows} rows (CE + 1..{max_rows - 1} teacher terms), got K={K}"
        )
    if N < 1:
        raise ValueError("grads has no columns (N = 0): nothing to combine")
    if grads.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"grads must be fp32, fp64, bf16 or fp16, got {grads.dtype}")
    if grads.stride(1) != 1:
        raise ValueError(
            "each row of grads must be contiguous (stride(1) == 1); pass grads.contiguous()"
        )
    return K, N


def _check_order(order, K: int) -> tuple[int, ...]:
    if order is None:
        return tuple(int(i) + 1 for i in torch.randperm(K - 1).tolist())
    if isinstance(order, torch.Tensor):
        order = order.tolist()
    try:
        perm = tuple(int(i) for i in order)
        if any(int(i) != i for i in order):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"order must be a sequence of ints, got {order!r}") from None
    if sorted(perm) != list(range(1, K)):
        raise ValueError(
            f"order must be a permutation of the teacher rows 1..{K - 1} (row 0 is the CE anchor), "
            f"got {list(perm)}"
        )
    return perm


def _check_active(active, K: int, device: torch.device) -> torch.Tensor:
    if active is None:
        return torch.ones(K, dtype=torch.bool, device=device)
    if isinstance(active, torch.Tensor):
        act = active.to(device=device, dtype=torch.bool)
    else:
        act = torch.tensor([bool(x) for x in active], dtype=torch.bool, device=device)
    if act.shape != (K,):
        raise ValueError(f"active must hold one boolean per row (K={K}), got shape {tuple(act.shape)}")
    return act


def _check_out(out: torch.Tensor, N: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != (N,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"accumulate_into must be a tensor of shape ({N},), got {shape}")
    if out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"accumulate_into must be a contiguous {dtype} tensor on {device}, "
            f"got {out.dtype} on {out.device} (contiguous={out.is_contiguous()})"
        )
