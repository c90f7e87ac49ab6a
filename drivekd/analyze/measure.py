"""What one sample contributes to the four pre-studies (METHOD.md section 10), from one forward.

Pure functions of the forward's outputs and the sample's `TokenLayout`; `measure_sample` runs the
forward itself. Layer axes:

* hidden-state index l = 0..L: 0 is the embedding output, l the output of decoder layer l-1 (the
  paper's "Layer l"), as transformers' `output_hidden_states` returns them (the last entry after the
  final norm);
* attention index k = 0..L-1: decoder layer k (HF `layer_idx`), whose output is hidden index k+1.

Per-sample results are small (a few floats per layer, plus the (L+1, D) last-token hidden states
and the (L, P) prefix-attention profiles the cross-sample analyses need), so they are written to
disk per sample and aggregated afterwards (drivekd.analyze.aggregate).
"""

from __future__ import annotations

import torch

from drivekd.roles import IGNORE_INDEX

# Cosines divide by max(||a|| * ||b||, EPS) (torch's cosine_similarity convention).
EPS = 1e-8
TOPK = 10


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension, in float64 (the sums run over thousands of
    entries; float64 keeps the aggregates reproducible to well below 1e-5)."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)


def adjacent_similarity(hidden: torch.Tensor) -> torch.Tensor:
    """hidden (L+1, T, D) -> (L,): entry l-1 = mean over positions t of cos(h^l_t, h^{l-1}_t), l = 1..L."""
    return cosine(hidden[1:], hidden[:-1]).mean(-1)


def vision_text_similarity(hidden: torch.Tensor, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """hidden (L+1, T, D), vision/text (T,) bool -> (L+1,): cos(mean_V h^l, mean_X h^l).
    NaN when the sample has no vision or no text positions."""
    if not bool(vision.any()) or not bool(text.any()):
        return torch.full((hidden.shape[0],), float("nan"), dtype=torch.float64)
    return cosine(hidden[:, vision].double().mean(1), hidden[:, text].double().mean(1))


def last_text_position(text: torch.Tensor) -> int:
    """The last non-special, non-vision position: with the answer in the sequence, the last answer
    token before the end-of-turn token."""
    pos = text.nonzero()
    if len(pos) == 0:
        raise ValueError("the sample has no text positions")
    return int(pos[-1])


def prefix_block_end(ids: torch.Tensor, vision: torch.Tensor, delimiters: torch.Tensor) -> int:
    """One past the last vision (or vision-delimiter) token: the block of system and image tokens
    that every question about the same images shares (images come first in the user turn). 0 when
    the sample has no image."""
    mark = vision | torch.isin(ids, delimiters)
    pos = mark.nonzero()
    return int(pos[-1]) + 1 if len(pos) else 0


def prefix_attention_profile(maps: torch.Tensor, text: torch.Tensor, P: int) -> torch.Tensor:
    """maps (L, T, T) head-mean attention, text (T,) bool, P the prefix block end -> (L, P): the
    mean over the sample's own query rows (text positions >= P: its question and answer tokens) of
    their attention on the prefix block's keys.

    Why not the P x P block itself: under causal attention rows < P see only prefix tokens, so that
    block is identical for every question about the same images and its dispersion is exactly 0.
    What differs between questions is how their own tokens read the shared block.
    """
    rows = text.clone()
    rows[:P] = False
    if P == 0 or not bool(rows.any()):
        return torch.zeros(maps.shape[0], P, dtype=torch.float32)
    return maps[:, rows, :P].double().mean(1).float()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict an answer token (labels[t+1] is not ignored): (n,) int64."""
    return (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)


def confidence(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """logits (n, V) at answer positions -> (len(temperatures), 3): per temperature tau, the mean
    over positions of
      top1   = p_(1), the largest probability of softmax(logits / tau);
      top10  = sum of the 10 largest probabilities (top-10 mass);
      margin = p_(1) - mean(p_(2), ..., p_(10)), the top-1 probability over the average of the rest
               of the top 10 (drivekd's definition: the paper's formula was lost in extraction).
    k = min(10, V) for vocabularies smaller than 10."""
    k = min(TOPK, logits.shape[-1])
    rows = []
    for tau in temperatures:
        p = torch.softmax(logits.double() / tau, dim=-1)
        top = p.topk(k, dim=-1).values  # (n, k), descending
        rest = top[:, 1:].mean(-1) if k > 1 else torch.zeros_like(top[:, 0])
        rows.append(torch.stack([top[:, 0].mean(), top.sum(-1).mean(), (top[:, 0] - rest).mean()]))
    return torch.stack(rows)


CONFIDENCE_FIELDS = ("top1", "top10_mass", "margin")


def sample_measures(hidden: torch.Tensor, maps: torch.Tensor, answer_logits: torch.Tensor, layout,
                    delimiters: torch.Tensor, temperatures: list[float]) -> dict:
    """Everything one sample contributes, from its unpadded forward outputs (any device; the
    results come back on the CPU).

    hidden (L+1, T, D), maps (L, T, T) head-mean attention of every decoder layer, answer_logits
    (n, V) the logits at `answer_positions(layout.labels)`.
    """
    dev = hidden.device
    vision, text = layout.vision.to(dev), layout.text.to(dev)
    P = prefix_block_end(layout.input_ids, layout.vision, delimiters)
    last = last_text_position(layout.text)
    n = answer_logits.shape[0]
    return {
        "adjacent": adjacent_similarity(hidden).float().cpu(),  # (L,)
        "vision_text": vision_text_similarity(hidden, vision, text).float().cpu(),  # (L+1,)
        "last_hidden": hidden[:, last].float().cpu().clone(),  # (L+1, D)
        "prefix_len": P,
        "prefix_ids": layout.input_ids[:P].clone(),  # (P,): questions are compared only on one same prefix
        "prefix_attention": prefix_attention_profile(maps, text, P).cpu(),  # (L, P)
        "confidence": confidence(answer_logits, temperatures).float().cpu() if n else None,  # (n_tau, 3)
        "answer_tokens": int(n),
        "fingerprint": layout.fingerprint,
    }


def measure_sample(model, family, sample, num_layers: int, temperatures: list[float], device="cpu") -> dict:
    """One forward of `sample` (batch 1, unpadded, prompt + reference answer) with every decoder
    layer's head-mean attention captured, then `sample_measures`."""
    from drivekd.families.capture import capture_attention

    inputs = family.build_inputs([sample]).to(device)
    lay = inputs.layouts[0]
    with torch.no_grad(), capture_attention(model, range(num_layers)) as maps:
        out = model(**inputs.tensors, output_hidden_states=True)
    # Everything stays on the model's device until reduced: a real 8B forward at T = 1800 has
    # ~0.75 GB of hidden states and ~1 GB of logits in fp32.
    hidden = torch.stack([h[0] for h in out.hidden_states]).float()  # (L+1, T, D)
    if hidden.shape[0] != num_layers + 1:
        raise RuntimeError(f"expected {num_layers + 1} hidden states, the model returned {hidden.shape[0]}")
    attn = torch.stack([maps[k][0] for k in range(num_layers)])  # (L, T, T) fp32
    ans = answer_positions(lay.labels).to(out.logits.device)
    delims = torch.tensor(sorted(family._vision_delimiters()), dtype=torch.long)
    return sample_measures(hidden, attn, out.logits[0, ans].float(), lay, delims, temperatures)
