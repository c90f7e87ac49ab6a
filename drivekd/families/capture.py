"""Head-mean attention of selected decoder layers, while every layer keeps running sdpa.

`output_attentions=True` needs eager attention and returns every layer's (B, H, T, T) maps at once
(28 layers x 28 heads x 1800^2 in bf16 is ~5 GB). drivekd instead registers one attention function
with `transformers.AttentionInterface` for the language model. It always computes the layer output
with stock sdpa; only for the layers a `capture_attention` context selected does it also form
softmax(QK^T * scaling + mask) head chunk by head chunk and keep the head mean (B, T, T) in fp32.
Memory beyond sdpa: the selected layers' (B, T, T) maps plus one head chunk's scores.

The same function serves the teacher (no gradient) and the student (gradient through Q and K).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) averaged over heads, in fp32.

    query: (B, H, Q, D) after RoPE; key: (B, Hkv, K, D) (grouped-query heads are expanded here).
    Returns (B, Q, K). Fully masked rows (padding queries) come out as exactly zero.
    """
    # Under bf16 autocast (GPU training) the matmul below would run in bf16 and the fp32-min fill
    # would overflow it: the map is always formed in fp32.
    with torch.autocast(query.device.type, enabled=False):
        return _head_mean_fp32(query, key, attention_mask, scaling)


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
            a = head_mean_attention(query, key, attention_mask, scale)  # (B, Q, K)
            if cap.padding is not None and a.shape[1] == a.shape[2] == cap.padding.shape[1]:
                # Right-padding queries still attend to real keys causally: zero their rows too.
                m = cap.padding.to(a.device, a.dtype)
                a = a * m[:, :, None] * m[:, None, :]
            cap.maps[module.layer_idx] = a
    return out


AttentionInterface.register(CAPTURE_IMPL, _capture_attention_forward)
# Same masks as stock sdpa (None when plain causal, else boolean): without a registered mask
# function, padding masks would arrive as None.
AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers of a supported VLM (HF layout: model.language_model.layers)."""
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
    cap = _Capture(layers=layers, grad=grad, padding=None if attention_mask is None else attention_mask.bool())
    attns = [mods[i].self_attn for i in layers]
    for a in attns:
        a._drivekd_capture = cap
    try:
        yield cap.maps
    finally:
        for a in attns:
            a._drivekd_capture = None
