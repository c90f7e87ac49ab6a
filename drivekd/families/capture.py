"""Head-mean attention of selected decoder layers, while every layer keeps running sdpa.

`output_attentions=True` needs eager attention and returns every layer's (B, H, T, T) maps at once
(28 layers x 28 heads x 1800^2 in bf16 is ~5 GB). drivekd instead registers one attention function
with `transformers.AttentionInterface` for the language model. It always computes the layer output
with stock sdpa; only for the layers a `capture_attention` context selected does it also form
softmax(QK^T * scaling + mask) block by block (head chunks x causal row blocks) and keep the head
mean (B, T, T) in fp32. Memory beyond sdpa: the selected layers' (B, T, T) maps plus one block's scores.

The same forward code serves the teacher (no gradient) and the student (gradient through Q and K).
With gradients, `HeadMeanAttention` (a custom autograd function) saves only query, key and the mask
it was given (tensors sdpa keeps anyway); its backward recomputes each block's probabilities. Autograd through the plain loop (kept as
`head_mean_attention_reference`) would instead keep every block's fp32 softmax, H x T^2 / 2 x 4 bytes
per captured layer (~90 MB for InternVL3-1B at T = 1800; 23 layers in the reasoning recipe).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPL = "drivekd_capture"

# Scores of at most this many elements (B * heads * Q * K) are formed at once: bounds the
# transient memory of the capture at ~256 MB in fp32 whatever T is.
MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024
# Query rows per block of the causal (lower-triangle) computation.
ROW_BLOCK = 256


@dataclass
class _Capture:
    layers: frozenset[int]
    grad: bool
    padding: torch.Tensor | None  # (B, T) bool, True on real tokens
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    # Tensor-parallel teacher (drivekd.teacher.parallel): each rank sees only its own heads, so
    # the map it forms is the mean over them; reduce(map, local_heads) turns it into the mean
    # over all heads (weighted sum, then an all-reduce over the rank's tensor-parallel group).
    reduce: Callable[[torch.Tensor, int], torch.Tensor] | None = None


def _allowed(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, Q, K) mask of attendable keys; None means plain causal (sdpa's skip)."""
    if attention_mask is None:
        # Causal with the queries at the end of the keys (prefix-cache case: K > Q).
        q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        k = torch.arange(k_len, device=device)[None, :]
        return (k <= q)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    # Additive float mask: 0 where allowed, a large negative number elsewhere.
    return attention_mask[..., :k_len] == 0


def _geometry(query: torch.Tensor, key: torch.Tensor, attention_mask):
    """Masks and block plan shared by forward and backward.

    Returns (masked (B|1, 1, Q, K) bool: True where a key is hidden; causal: whether every block of
    rows [a, b) may stop at key off + b; row_valid (B|1, Q) bool: rows with at least one key).
    Without a mask (sdpa's plain causal skip: batch 1 or no padding) masked and row_valid are None:
    only the diagonal square of each row block needs masking (see _scores).
    """
    if attention_mask is None:
        return None, True, None
    Q, K = query.shape[2], key.shape[2]
    off = K - Q  # queries are the last Q positions (K > Q with a prefix cache)
    allowed = _allowed(attention_mask, Q, K, query.device)  # (B|1, 1, Q, K)
    # Causal masks hide every key after a query: a block of query rows [a, b) needs keys
    # [0, off + b) only, which halves the scores, softmax and transient memory. Should a mask
    # ever allow a later key (not for these causal LMs), fall back to full rows.
    future = torch.ones(Q, K, dtype=torch.bool, device=query.device).triu(off + 1)
    causal = not bool((allowed & future).any())
    row_valid = allowed.any(dim=-1).squeeze(1)  # (B|1, Q)
    return ~allowed, causal, row_valid


def _blocks(B: int, H: int, Hkv: int, Q: int, K: int, causal: bool):
    """(h0, h1, a, b, kend) blocks: head chunks of whole kv groups x causal row blocks.

    A chunk holds whole groups of the rep = H / Hkv query heads that share a kv head, so its
    scores are one batched matmul against the un-expanded key: (B, g, rep*rows, D) @ (B, g, D, kend).
    """
    rep = H // Hkv
    off = K - Q
    rows = max(1, min(Q, ROW_BLOCK))
    per_group = B * rep * rows * K
    groups = max(1, min(Hkv, MAX_CHUNK_ELEMENTS // max(per_group, 1)))
    for g0 in range(0, Hkv, groups):
        g1 = min(Hkv, g0 + groups)
        for a in range(0, Q, rows):
            b = min(Q, a + rows)
            yield g0 * rep, g1 * rep, a, b, (off + b if causal else K)


def _scores(q_all, k_all, masked, h0, h1, a, b, kend, rep):
    """Masked fp32 scores of one block, (B, h1-h0, b-a, kend); q_all is already scaled."""
    B, _, _, D = q_all.shape
    c, r = h1 - h0, b - a
    # (B, c, r, D) -> (B, g, rep*r, D): heads of one kv group stacked along rows (a small copy).
    qg = q_all[:, h0:h1, a:b].reshape(B, c // rep, rep * r, D)
    kg = k_all[:, h0 // rep : h1 // rep, :kend]  # (B, g, kend, D)
    s = torch.matmul(qg, kg.transpose(-1, -2)).view(B, c, r, kend)
    # finfo.min, not -inf: a fully padded row must give finite values, not NaN.
    neg = torch.finfo(torch.float32).min
    if masked is None:
        # Plain causal, queries last (kend = off + b): keys before off + a are visible to every row
        # of the block; of the last r keys, row j sees the first j + 1 (a strict upper triangle hidden).
        upper = torch.ones(r, r, dtype=torch.bool, device=s.device).triu_(1)
        s[..., kend - r :].masked_fill_(upper, neg)
        return s, qg, kg
    return s.masked_fill_(masked[..., a:b, :kend], neg), qg, kg


def _out_mask(row_valid, padding, Q: int, K: int):
    """(B|1, Q, 1) row and (B|1, 1, K) column keep-masks (fp32 0/1) of the map, or None.

    Rows with no allowed key (left-padding queries) are uniform after softmax; right-padding
    queries still attend to real keys causally. Both are zeroed, and so are padding keys'
    columns, so a padded map never carries a signal.
    """
    rows = None if row_valid is None or bool(row_valid.all()) else row_valid
    cols = None
    if padding is not None and Q == K == padding.shape[1]:
        pad = padding.to(torch.bool)
        rows = pad if rows is None else rows & pad
        cols = pad
    return (None if rows is None else rows[:, :, None].float(), None if cols is None else cols[:, None, :].float())


def _forward(query, key, attention_mask, scaling: float, padding):
    """Head-mean map (B, Q, K) fp32."""
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    rep = H // Hkv
    masked, causal, row_valid = _geometry(query, key, attention_mask)
    acc = torch.zeros(B, Q, K, dtype=torch.float32, device=query.device)
    q_all = query.float() * scaling  # scale on Q: Q*D elements, not Q*K
    k_all = key.float()
    for h0, h1, a, b, kend in _blocks(B, H, Hkv, Q, K, causal):
        s, _, _ = _scores(q_all, k_all, masked, h0, h1, a, b, kend, rep)  # (B, c, r, kend)
        acc[:, a:b, :kend].add_(torch.softmax(s, dim=-1).sum(dim=1))
    acc.div_(H)
    rows, cols = _out_mask(row_valid, padding, Q, K)
    if rows is not None:
        acc.mul_(rows)
    if cols is not None:
        acc.mul_(cols)
    return acc


class HeadMeanAttention(torch.autograd.Function):
    """A = mean_h softmax(Q_h K_h^T * scaling + mask), saving no new tensor for backward.

    Saved: query (B, H, Q, D) and key (B, Hkv, K, D) as given (the tensors sdpa saves too), the
    attention mask and padding as given (shared by every layer). Backward, block by block:
    P_h = softmax(S_h) recomputed, dS_h = P_h * (g - rowsum(P_h * g)) with g = dA / H,
    dQ = dS K * scaling, dK = sum over the heads of a kv group of dS^T Q * scaling.
    """

    # Works under torch.func transforms: the Gram engine vmaps the backward over K grad_outputs, and
    # gradient checkpointing then re-runs this forward inside that vmap. So: setup_context, a
    # generated vmap rule, and a backward without in-place writes into unbatched buffers.
    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, attention_mask, scaling, padding):
        with torch.autocast(query.device.type, enabled=False):
            return _forward(query, key, attention_mask, scaling, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, attention_mask, scaling, padding = inputs
        ctx.scaling = scaling
        # The mask and padding are the tensors every captured layer receives: no new storage.
        ctx.save_for_backward(query, key, attention_mask, padding)

    @staticmethod
    def backward(ctx, grad):
        query, key, attention_mask, padding = ctx.saved_tensors
        with torch.autocast(query.device.type, enabled=False):
            dq, dk = _backward(query, key, attention_mask, padding, ctx.scaling, grad)
        return dq.to(query.dtype), dk.to(key.dtype), None, None, None


def _backward(query, key, attention_mask, padding, scaling: float, grad):
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    rep = H // Hkv
    masked, causal, row_valid = _geometry(query, key, attention_mask)
    g = grad.float() / H  # (B, Q, K): d/dP_h of the head mean
    rows, cols = _out_mask(row_valid, padding, Q, K)
    if rows is not None:
        g = g * rows
    if cols is not None:
        g = g * cols
    q_all = query.float() * scaling
    k_all = key.float()
    # Out of place (lists, cat, pad): under vmap, grad is batched and these buffers would not be.
    dq_parts: dict[int, list[torch.Tensor]] = {}  # head chunk -> row blocks' (B, c, r, D)
    dk_parts: dict[int, torch.Tensor] = {}  # head chunk -> (B, g, K, D), summed over row blocks
    for h0, h1, a, b, kend in _blocks(B, H, Hkv, Q, K, causal):
        c, r = h1 - h0, b - a
        s, qg, kg = _scores(q_all, k_all, masked, h0, h1, a, b, kend, rep)
        # Every block holds whole rows (all keys up to the causal end), so P_h is recomputed with the
        # forward's own softmax: bitwise the forward's P, and one fused op where flash attention's
        # exp(S - lse) would need a saved log-sum-exp and two passes.
        p = torch.softmax(s, dim=-1)  # (B, c, r, kend)
        del s  # at most two block-sized tensors alive: p and ds
        gb = g[:, None, a:b, :kend]  # (B, 1, r, kend), shared by every head
        # dS = P * (g - rowsum(P * g)): out of place then one in-place multiply (no addcmul_: vmap
        # has no batching rule for it and would loop over the Gram engine's K gradients).
        rs = (p * gb).sum(dim=-1, keepdim=True)  # (B, c, r, 1)
        ds = (gb - rs).mul_(p)
        dsg = ds.view(B, c // rep, rep * r, kend)
        dq_parts.setdefault(h0, []).append(torch.matmul(dsg, kg).view(B, c, r, D))
        # (B, g, kend, rep*r) @ (B, g, rep*r, D): the sum over a kv group's heads is in the matmul.
        part = torch.nn.functional.pad(torch.matmul(dsg.transpose(-1, -2), qg), (0, 0, 0, K - kend))
        dk_parts[h0] = part if h0 not in dk_parts else dk_parts[h0] + part
    dq = torch.cat([torch.cat(dq_parts[h], dim=2) for h in sorted(dq_parts)], dim=1)
    dk = torch.cat([dk_parts[h] for h in sorted(dk_parts)], dim=1)
    # S = (scaling * Q) K^T: dK already carries the scaling through q_all; dQ needs it here.
    return dq * scaling, dk


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float,
                        padding: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) averaged over heads, in fp32.

    query: (B, H, Q, D) after RoPE; key: (B, Hkv, K, D) (grouped-query heads share a kv head).
    Returns (B, Q, K). Fully masked rows (padding queries) come out as exactly zero; with
    `padding` (B, T) bool (True on real tokens) and Q == K == T, padding rows and columns too.
    With gradients on, backward recomputes the probabilities (see HeadMeanAttention).
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return HeadMeanAttention.apply(query, key, attention_mask, scaling, padding)
    # Teacher pass (no gradients): the same forward.
    # Under bf16 autocast (GPU) the matmul would run in bf16 and the fp32-min fill would overflow
    # it: the map is always formed in fp32.
    with torch.autocast(query.device.type, enabled=False):
        return _forward(query, key, attention_mask, scaling, padding)


def head_mean_attention_reference(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float,
                                  padding: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-autograd capture head_mean_attention replaced: same result, but autograd keeps
    every block's fp32 softmax (H x Q x K / 2 floats per layer). Kept for equality tests and
    tools/bench_capture.py."""
    with torch.autocast(query.device.type, enabled=False):
        a = _head_mean_fp32(query, key, attention_mask, scaling)
    if padding is not None and a.shape[1] == a.shape[2] == padding.shape[1]:
        m = padding.to(a.device, a.dtype)
        a = a * m[:, :, None] * m[:, None, :]
    return a


def _head_mean_fp32(query, key, attention_mask, scaling: float) -> torch.Tensor:
    B, H, Q, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    rep = H // Hkv
    off = K - Q  # queries are the last Q positions (K > Q with a prefix cache)
    allowed = _allowed(attention_mask, Q, K, query.device)  # (B|1, 1, Q, K)
    masked = ~allowed
    neg = torch.finfo(torch.float32).min
    # Causal masks hide every key after a query: a block of query rows [a, b) needs keys
    # [0, off + b) only, which halves the scores, softmax and transient memory. Should a mask
    # ever allow a later key (not for these causal LMs), fall back to full rows.
    future = torch.ones(Q, K, dtype=torch.bool, device=query.device).triu(off + 1)
    causal = not bool((allowed & future).any())
    rows = max(1, min(Q, ROW_BLOCK))
    per_row_block = B * rows * K
    chunk = max(1, min(H, MAX_CHUNK_ELEMENTS // max(per_row_block, 1)))
    acc = torch.zeros(B, Q, K, dtype=torch.float32, device=query.device)
    q_all = query.float() * scaling  # scale on Q: Q*D elements, not Q*K
    k_all = key.float()
    # In-place fill and sums: none of those ops' backward functions need their outputs, so this
    # is safe under autograd (the slices of acc join the graph through CopySlices).
    for h0 in range(0, H, chunk):
        h1 = min(H, h0 + chunk)
        kv_idx = torch.arange(h0, h1, device=query.device) // rep
        k = k_all.index_select(1, kv_idx)  # (B, c, K, D)
        for a in range(0, Q, rows):
            b = min(Q, a + rows)
            kend = off + b if causal else K
            s = torch.matmul(q_all[:, h0:h1, a:b], k[:, :, :kend].transpose(-1, -2))  # (B, c, b-a, kend)
            # finfo.min, not -inf: a fully padded row must give finite values, not NaN.
            s.masked_fill_(masked[..., a:b, :kend], neg)
            acc[:, a:b, :kend].add_(torch.softmax(s, dim=-1).sum(dim=1))
    acc.div_(H)
    # Rows with no allowed key (left-padding queries) are uniform after softmax; zero them so a
    # padded map never carries a signal.
    row_valid = allowed.any(dim=-1).squeeze(1)  # (B|1, Q)
    if not bool(row_valid.all()):
        acc.mul_(row_valid[..., None].to(acc.dtype))
    return acc


def _capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q, k, v = query, key, value
    dev = query.device.type
    if torch.is_autocast_enabled(dev) and len({query.dtype, key.dtype, value.dtype}) > 1:
        # What autocast does at sdpa anyway (fp32 RoPE'd q/k, bf16 v). Done by hand because a
        # checkpointed layer recomputed inside torch.vmap (GramEngine's batched backward) skips
        # autocast for sdpa and would see mixed dtypes.
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    out = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cap: _Capture | None = getattr(module, "_drivekd_capture", None)
    if cap is not None and module.layer_idx in cap.layers:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        with torch.set_grad_enabled(cap.grad and torch.is_grad_enabled()):
            # (B, Q, K); padding rows and columns zeroed when Q == K == T (no prefix cache).
            m = _IMPL[0](query, key, attention_mask, scale, padding=cap.padding)
        cap.maps[module.layer_idx] = m if cap.reduce is None else cap.reduce(m, query.shape[1])
    return out


# Attribute of a model whose attention heads are split across ranks: its _Capture.reduce.
HEAD_REDUCE_ATTR = "_drivekd_head_reduce"


def sharded_head_mean(group, heads: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The reduce of a tensor-parallel capture: `heads` attention heads in all, split across the
    ranks of `group`. A rank's map (B, Q, K) is the mean over its `local` heads; weighted by
    local / heads and summed over the group it is the mean over every head (a sum over heads,
    then one all-reduce). Every rank of the group ends with the same full map."""
    import torch.distributed as dist

    def reduce(m: torch.Tensor, local: int) -> torch.Tensor:
        m.mul_(local / heads)
        dist.all_reduce(m, op=dist.ReduceOp.SUM, group=group)
        return m

    return reduce


# The head-mean function the capture calls; `reference_capture()` swaps in the reference.
_IMPL = [head_mean_attention]


@contextlib.contextmanager
def reference_capture():
    """Within the block, captures run `head_mean_attention_reference` (equality tests, benchmarks)."""
    prev = _IMPL[0]
    _IMPL[0] = head_mean_attention_reference
    try:
        yield
    finally:
        _IMPL[0] = prev


AttentionInterface.register(CAPTURE_IMPL, _capture_attention_forward)
# Same masks as stock sdpa (None when plain causal, else boolean): without a registered mask
# function, padding masks would arrive as None.
AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers of a supported VLM (HF layout: model.language_model.layers)."""
    if hasattr(model, "get_base_model"):  # a LoRA student (peft.PeftModel): the HF model inside
        model = model.get_base_model()
    lm = model.model.language_model if hasattr(model, "model") else model.language_model
    return list(lm.layers)


def num_decoder_layers(model) -> int:
    return len(decoder_layers(model))


@contextlib.contextmanager
def capture_attention(model, layers, grad: bool = False, attention_mask: torch.Tensor | None = None):
    """Within the block, forward passes of `model` record head-mean attention of `layers`.

    Yields a dict {layer_idx: (B, T, T) fp32 tensor}, filled by the forward pass (the latest pass
    overwrites). `grad=True` keeps the graph through the maps (the student's attention losses).
    With `attention_mask` (B, T), rows and columns of padding tokens are exactly zero.
    The model must have been loaded with the capture implementation (see families.base.load_model).
    """
    mods = decoder_layers(model)
    layers = frozenset(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < len(mods)]
    if bad:
        raise ValueError(f"layers {sorted(bad)} out of range: the model has {len(mods)} decoder layers (0..{len(mods) - 1})")
    impl = mods[0].self_attn.config._attn_implementation
    if impl != CAPTURE_IMPL:
        raise RuntimeError(
            f"the language model runs attention {impl!r}; load it with drivekd.families.load_model(..., capture=True) "
            "to capture attention"
        )
    # A tensor-parallel teacher carries its head reduction (drivekd.teacher.parallel.load_teacher).
    reduce = getattr(model, HEAD_REDUCE_ATTR, None)
    if reduce is not None and grad:
        raise RuntimeError("attention capture with gradients through a tensor-parallel model is not supported: "
                           "the head all-reduce is not differentiable (only the teacher pass runs tensor-parallel)")
    cap = _Capture(layers=layers, grad=grad, padding=None if attention_mask is None else attention_mask.bool(), reduce=reduce)
    attns = [mods[i].self_attn for i in layers]
    for a in attns:
        a._drivekd_capture = cap
    try:
        yield cap.maps
    finally:
        for a in attns:
            a._drivekd_capture = None
