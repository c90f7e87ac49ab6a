"""CE+KL baseline: KL(teacher || student) on the answer positions from a stored top-k (METHOD.md 3).

The store keeps the teacher's top-k log-probabilities, their token ids and the log of the mass
outside them (drivekd.store.signals). Both distributions are compared on the same k + 1 buckets:
the teacher's k tokens, and one tail bucket holding everything else. For the student, the tail is
its exact mass outside the teacher's k ids (a logsumexp over the rest of its vocabulary, padding
rows included). At temperature tau each bucket distribution is softened alike:

    t = log_softmax([lp_1..lp_k, log_tail] / tau)        s = log_softmax([ls_1..ls_k, ls_tail] / tau)
    L = tau^2 * sum_i exp(t_i) (t_i - s_i)               per answer position, mean over them per sample

At tau = 1 this is exactly the KL between the two distributions coarsened to those buckets: a lower
bound of the full-vocabulary KL that loses only the shape of the teacher's tail (by the data
processing inequality), and equal to it when the tail is empty. The renormalising log_softmax
also absorbs the fp16 rounding of the stored log-probabilities. At tau != 1 the tail is softened
as one token would be (the store cannot say how its mass splits). tau^2 keeps the gradient scale
independent of tau (Hinton et al.; DistillKit scales its logit KL the same way).
"""

from __future__ import annotations

import torch

# tau = 1: the Drive-KD paper gives no tau for its CE+KL row (its equations are lost) and its KL
# pre-study works at ~1; and only at tau = 1 is the bucketed KL exact (at tau = 2, the value DistillKit's
# distil_logits.py uses, it is 0.64-0.88 of the full tempered KL on the demo models, gradient cosine
# 0.85-0.90, since the tail cannot be softened exactly: tools/bench_signals.py measures it).
DEFAULT_TEMPERATURE = 1.0


def student_buckets(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, P, V) student logits, (B, P, k) teacher top-k ids -> (B, P, k + 1) student log-probs of
    the k tokens and of the tail (all other ids)."""
    lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)  # fp32 at least
    top = lp.gather(-1, index)
    tail = lp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], -1)


def topk_kl(logits: torch.Tensor, t_logprobs: torch.Tensor, t_index: torch.Tensor, t_log_tail: torch.Tensor, mask: torch.Tensor,
            temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """tau^2 * KL(teacher || student) over the k + 1 buckets, mean over each sample's answer
    positions: (B,). Shapes: logits (B, P, V); t_logprobs, t_index (B, P, k); t_log_tail, mask
    (B, P) (mask: the position is one of the sample's answer positions). A sample without any
    gets 0, not NaN."""
    tau = float(temperature)
    dt = torch.promote_types(logits.dtype, torch.float32)
    t = torch.cat([t_logprobs.to(dt), t_log_tail.to(dt)[..., None]], -1)
    t = torch.log_softmax(t / tau, -1)
    s = torch.log_softmax(student_buckets(logits, t_index) / tau, -1)
    pt = t.exp()
    # 0 * log 0 = 0: an empty tail (k = V) or a masked-out (padding) position contributes nothing.
    kl = torch.where(pt > 0, pt * (t - s), torch.zeros_like(pt)).sum(-1)  # (B, P)
    m = mask.to(kl.dtype)
    return tau * tau * (kl * m).sum(-1) / m.sum(-1).clamp_min(1)
