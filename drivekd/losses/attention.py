"""Drive-KD losses (METHOD.md sections 3-4) as pure functions of tensors.

Every loss returns one value per sample, shape (B,): the trainer weights samples by the mixing
matrix (a micro-batch can mix capabilities) and averages over the batch, so a sample weighs the
same whatever else shares its micro-batch, and a batch of B on one rank equals B ranks of one.

Shapes: attention maps are (B, T, T) head-mean maps, rows = queries, columns = keys, zero above the
diagonal and on padding rows/columns; `text`, `vision`, `valid` are (B, T) bool masks of the same
padded batch (X, V, and the real tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from drivekd.roles import IGNORE_INDEX

SIGNALS = ("t2v", "full")
KINDS = ("mse", "cosine")
# Reductions of the full-map MSE, by what they average (METHOD.md 3). "entries" is the authors'
# released form, whose numbers the paper reports; "per-query" weights every query row equally, so
# the short rows of the system prompt dominate it (49-75% of the value on the demo models).
FULL_REDUCTIONS = ("entries", "per-query")
DEFAULT_FULL_REDUCTION = "entries"
# Names used before issue 22 (old run.json, checkpoints and ablation files still say them):
# "reference" was the authors' T x T mean, "paper" the per-query mean (then the default).
FULL_REDUCTION_ALIASES = {"reference": "entries", "paper": "per-query"}


def full_reduction_name(name: str) -> str:
    """The current name of a full-map reduction, given it or an older alias (ValueError otherwise)."""
    name = FULL_REDUCTION_ALIASES.get(name, name)
    if name not in FULL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(FULL_REDUCTIONS)} (or the older "
                         f"{', '.join(FULL_REDUCTION_ALIASES)}), got {name!r}")
    return name


# ----------------------------------------------------------------------------- hard label


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over positions whose target is not IGNORE_INDEX.

    logits (B, P, V) predict targets (B, P) (already shifted). A sample without any target gets 0
    (it contributes no gradient), not NaN.
    """
    B, P, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(B * P, V), targets.reshape(B * P), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(B, P)
    n = (targets != IGNORE_INDEX).sum(-1)  # (B,)
    return ce.sum(-1) / n.clamp_min(1)


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on the answer span: logits (B, T, V) at t predict labels (B, T) at t+1.

    `labels` is IGNORE_INDEX outside the answer span (image, user turn, padding), so only answer tokens
    count. Per-sample mean over the sample's answer tokens; shape (B,).
    """
    return token_ce(logits[:, :-1], labels[:, 1:])


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose logits the CE needs, and their next-token targets.

    labels (B, T) -> (keep (P,) sorted positions t where some row has labels[:, t+1] != IGNORE_INDEX,
    targets (B, P) = labels[:, keep + 1]). Passing `keep` as the model's `logits_to_keep` computes
    the (B, P, V) logits of the answer span only instead of (B, T, V): with a 151k vocabulary and
    T ~ 1800 that is ~1 GB of fp32 logits saved. `token_ce(logits_kept, targets)` then equals
    `answer_ce(full_logits, labels)`.
    """
    nxt = labels[:, 1:]
    keep = (nxt != IGNORE_INDEX).any(0).nonzero().squeeze(-1)
    return keep, nxt[:, keep]


# ----------------------------------------------------------------------------- attention


def causal_valid(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask -> (B, T, T) valid query-key entries: both real, key <= query."""
    T = valid.shape[-1]
    tril = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return valid[:, :, None] & valid[:, None, :] & tril


def full_attention_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                       reduction: str = DEFAULT_FULL_REDUCTION) -> torch.Tensor:
    """Full-attention MSE (eq. 11), (B,).

    entries (the default; older name "reference"): the authors' released trainer, the mean over
        all T_b x T_b entries of the sample's own (unpadded) map. Entries above the diagonal are 0
        in both causal maps: they add nothing to the sum (they are masked) but count in the T_b^2
        divisor; equal to `F.mse_loss` on an unpadded causal map.
    per-query (older name "paper"): squared error over the valid query-key entries (real tokens,
        key <= query), averaged over the keys of each query, then over the real queries. Query i
        has i + 1 keys, so early rows (the system prompt) weigh far more than in `entries`.
    """
    reduction = full_reduction_name(reduction)
    # Memory: autograd keeps one fp32 (B, T, T) difference and a bool mask per call (the maps are
    # the big tensors of a step; multiplying by a float mask kept two more fp32 maps).
    if reduction == "per-query":
        m = causal_valid(valid)
        d2 = _masked_diff(student, teacher, m).pow(2)
        per_query = d2.sum(-1) / m.sum(-1).clamp_min(1)  # (B, T)
        q = valid.to(d2.dtype)
        return (per_query * q).sum(-1) / q.sum(-1).clamp_min(1)
    # Sum over the valid causal entries only: the entries above the diagonal are 0 in both real
    # maps, so this is the authors' value, and it stays so whatever a map holds there.
    d2 = _masked_diff(student, teacher, causal_valid(valid)).pow(2)  # (B, T, T)
    n = valid.sum(-1).to(torch.float32).pow(2)  # (B,): T_b^2, every entry of the unpadded map
    return d2.sum((-1, -2)) / n.clamp_min(1)


def t2v_mse(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """Text-to-vision MSE (eq. 12), (B,): sum_{i in X, j in V} (A^S_ij - A^T_ij)^2 / (|X| |V|).

    Taken from the full row-normalised maps (the t2v block is not re-normalised). Pairs with the
    text query before the image are included; both maps are zero there (causal).
    """
    m = text[:, :, None] & vision[:, None, :]
    n = text.sum(-1).to(torch.float32) * vision.sum(-1).to(torch.float32)
    return _masked_diff(student, teacher, m).pow(2).sum((-1, -2)) / n.clamp_min(1)


def _masked_diff(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A_S - A_T) on the entries in the bool `mask`, 0 elsewhere, fp32 (B, T, T)."""
    return torch.where(mask, student.float() - teacher.float(), 0.0)


def _masked_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """1 - <a_S, a_T> / (||a_S|| ||a_T|| + eps) over the entries in `mask`, per sample: (B,)."""
    s = torch.where(mask, student.float(), 0.0)  # keeps a bool mask for backward, not a float one
    t = torch.where(mask, teacher.float(), 0.0)
    dot = (s * t).sum((-1, -2))
    norm = s.pow(2).sum((-1, -2)).sqrt() * t.pow(2).sum((-1, -2)).sqrt()
    return 1.0 - dot / (norm + eps)


def t2v_cosine(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, vision: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine variant of the t2v loss (eq. 30-35): 1 - cos of the vectorised X x V blocks, (B,)."""
    return _masked_cosine(student, teacher, text[:, :, None] & vision[:, None, :], eps)


def full_attention_cosine(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine variant of the full-map loss: 1 - cos of the vectorised valid entries, (B,)."""
    return _masked_cosine(student, teacher, causal_valid(valid), eps)


def attention_loss(
    signal: str,
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    text: torch.Tensor,
    vision: torch.Tensor,
    valid: torch.Tensor,
    reduction: str = DEFAULT_FULL_REDUCTION,
) -> torch.Tensor:
    """Dispatch on (signal, kind): t2v|full x mse|cosine. Returns (B,)."""
    if signal == "t2v":
        return t2v_mse(student, teacher, text, vision) if kind == "mse" else t2v_cosine(student, teacher, text, vision)
    if signal == "full":
        return full_attention_mse(student, teacher, valid, reduction) if kind == "mse" else full_attention_cosine(student, teacher, valid)
    raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")


# ----------------------------------------------------------------------------- layers


def group_size(k: int, m: int) -> int:
    """g = max(1, m - k + 1) for k student and m teacher layers in range."""
    return max(1, m - k + 1)


def layer_groups(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """Layer-group matching (METHOD.md section 4).

    The i-th student layer in range is matched to the mean of the teacher layers at positions
    [min(i, m-g), min(i, m-g) + g) of the teacher range, g = max(1, m - k + 1). Returns
    [(student layer, (teacher layers...)), ...] in student order. With one layer on each side it
    is the plain single-layer pairing.
    """
    k, m = len(student_layers), len(teacher_layers)
    if k == 0 or m == 0:
        raise ValueError("layer-group matching needs at least one student and one teacher layer")
    g = group_size(k, m)
    out = []
    for i, s in enumerate(student_layers):
        start = min(i, m - g)
        out.append((int(s), tuple(int(t) for t in teacher_layers[start : start + g])))
    return out


def place_maps(maps: Sequence[torch.Tensor], T: int, side: str) -> torch.Tensor:
    """Per-sample (T_b, T_b) maps -> (B, T, T) aligned with a batch padded to T on `side`.

    Left padding puts sample b's tokens at positions T - T_b .. T-1, right padding at 0 .. T_b-1;
    the map goes to the same block, zeros elsewhere.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    out = torch.zeros(len(maps), T, T, dtype=torch.float32)
    for b, m in enumerate(maps):
        n = m.shape[-1]
        if m.shape != (n, n) or n > T:
            raise ValueError(f"map {b} has shape {tuple(m.shape)}; expected square with side <= {T}")
        o = T - n if side == "left" else 0
        out[b, o : o + n, o : o + n] = m
    return out
