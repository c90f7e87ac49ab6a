"""The teacher's forward for a store build: samples grouped by their images, and one group's
shared token prefix run once with each question's suffix against its KV cache (`shared_forward`)."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field

import torch

from drivekd.data.sample import Sample
from drivekd.families.base import family_class
from drivekd.families.capture import capture_attention


def image_groups(samples: list[Sample]) -> list[list[Sample]]:
    """Samples grouped by their images, groups in order of first appearance, members in data order."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_key, []).append(s)
    return list(groups.values())


def common_prefix_length(seqs: list[torch.Tensor]) -> int:
    n = min(int(x.numel()) for x in seqs)
    first = seqs[0][:n]
    same = torch.ones(n, dtype=torch.bool)
    for x in seqs[1:]:
        same &= x[:n] == first
    diff = (~same).nonzero()
    return int(diff[0]) if len(diff) else n


@dataclass
class SharedMaps:
    prefix_length: int  # P
    key: str  # content hash of the prefix tokens and pixels
    prefix: dict[int, torch.Tensor]  # layer -> (P, P)
    suffixes: list[dict[int, torch.Tensor] | None]  # per sample: layer -> (T_i - P, T_i), None if not needed
    prefix_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (P, H) (hidden_layers only)
    hidden: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per sample: layer -> (T_i - P, H)
    logits: list[torch.Tensor | None] = field(default_factory=list)  # per sample: (A_i, V) at its logits_rows


def kv_cache_arg(model) -> str:
    """The name of the KV-cache argument (and output field) of `model.forward`: transformers 5.24
    renamed `past_key_values` to `cache` (the old name warns and goes in 5.40); earlier 5.x releases
    know only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_forward(model, encoded, layers, need=None, device="cpu", hidden_layers=(), logits_rows=None) -> SharedMaps:
    """Head-mean maps of a group of samples that share their images, computing the shared prefix once.

    encoded: [(processor tensors, TokenLayout)] per sample (Family.encode, batch 1, unpadded).
    Under causal attention the first P rows of every member's map depend only on the common P
    tokens: they come from one prefix forward; each member then runs only its suffix against the
    prefix's KV cache. Equal to per-sample forwards within fp32 rounding.

    hidden_layers: also return those layers' hidden states (prefix once, each suffix's own rows);
    logits_rows: per sample, the positions (T_i,-coordinates) whose next-token logits to return, or None.
    """
    ids = [lay.input_ids for _, lay in encoded]
    need = need or [True] * len(encoded)
    # Every suffix keeps at least one token.
    P = min(common_prefix_length(ids), min(int(x.numel()) for x in ids) - 1)
    t0 = encoded[0][0]
    # The same token ids can carry other pixels: the key hashes both.
    h = hashlib.sha256(ids[0][:P].to(torch.int32).numpy().tobytes())
    h.update(t0["pixel_values"].float().numpy().tobytes())
    key = "p-" + h.hexdigest()[:32]
    prefix_in = {"input_ids": t0["input_ids"][:, :P], "attention_mask": t0["attention_mask"][:, :P], "pixel_values": t0["pixel_values"]}
    rope_positions = family_class(model.config.model_type).rope_positions
    full_pos = rope_positions(model, t0, device)  # (3, 1, T) for Qwen2.5-VL, None for 1-D RoPE
    if full_pos is not None:
        prefix_in.update(image_grid_thw=t0["image_grid_thw"], mm_token_type_ids=t0["mm_token_type_ids"][:, :P], position_ids=full_pos[..., :P])
    logits_rows = logits_rows or [None] * len(encoded)
    # Answer rows inside the prefix (only when questions share their first answer tokens): their
    # logits come from the prefix forward.
    in_prefix = sorted({int(t) for r in logits_rows if r is not None for t in r if t < P})
    extra = {"output_hidden_states": True} if hidden_layers else {}
    pkeep = torch.tensor(in_prefix or [P - 1])
    with torch.no_grad(), capture_attention(model, layers) as pmaps:
        out = model(**{k: v.to(device) for k, v in prefix_in.items()}, use_cache=True, logits_to_keep=pkeep.to(device), **extra)
    prefix_hidden = {l: out.hidden_states[l + 1][0] for l in hidden_layers}
    prefix_logits = out.logits[0]  # (len(pkeep), V)
    cache_arg = kv_cache_arg(model)
    cache = out[cache_arg]
    prefix = {l: m[0] for l, m in pmaps.items()}  # on the model's device
    suffixes: list[dict[int, torch.Tensor] | None] = []
    hidden, logits = [], []
    for (tens, lay), want, rows in zip(encoded, need, logits_rows):
        if not want:
            suffixes.append(None)
            hidden.append({})
            logits.append(None)
            continue
        T = lay.length
        pos = rope_positions(model, tens, device)
        suf = {
            "input_ids": tens["input_ids"][:, P:],
            "attention_mask": torch.ones(1, T, dtype=torch.long),
            "cache_position": torch.arange(P, T),
            # Explicit positions: the cached branch cannot rebuild M-RoPE positions itself.
            "position_ids": pos[..., P:] if pos is not None else torch.arange(P, T)[None],
        }
        if "mm_token_type_ids" in tens:
            suf["mm_token_type_ids"] = tens["mm_token_type_ids"][:, P:]
        skeep = (rows[rows >= P] - P) if rows is not None else torch.tensor([T - P - 1])
        with torch.no_grad(), capture_attention(model, layers) as smaps:
            sout = model(**{k: v.to(device) for k, v in suf.items()}, **{cache_arg: cache}, use_cache=True,
                         logits_to_keep=skeep.to(device), **extra)
        cache.crop(-(T - P))  # drop this suffix: back to the bare prefix for the next question
        suffixes.append({l: m[0] for l, m in smaps.items()})  # (T - P, T), on the model's device
        hidden.append({l: sout.hidden_states[l + 1][0] for l in hidden_layers})  # (T - P, H)
        if rows is None:
            logits.append(None)
        else:  # (A, V): rows in the prefix from the prefix forward, the others from this suffix's
            head = prefix_logits[torch.searchsorted(pkeep, rows[rows < P]).to(prefix_logits.device)]
            logits.append(torch.cat([head, sout.logits[0]]))
    return SharedMaps(P, key, prefix, suffixes, prefix_hidden, hidden, logits)
