"""Losses by their properties on tiny tensors: zero on identical maps, textbook formulas, masks."""

import pytest
import torch
import torch.nn.functional as F

from drivekd.losses import (
    answer_ce,
    answer_positions,
    attention_loss,
    full_attention_cosine,
    full_attention_mse,
    layer_groups,
    place_maps,
    plan_term,
    t2v_cosine,
    t2v_mse,
    token_ce,
)
from drivekd.layers import LayerSpecError, mid_range_spec, parse_role_layers, resolve_layers
from drivekd.roles import IGNORE_INDEX


def _map(T, seed):
    """A random causal row-normalised map (T, T), like a head-mean attention map."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, T, generator=g).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1)


def _sample(T, seed, n_vision=3):
    vision = torch.zeros(T, dtype=torch.bool)
    vision[2 : 2 + n_vision] = True
    text = ~vision
    text[0] = False  # a special token: neither X nor V
    return _map(T, seed), _map(T, seed + 100), text, vision


def _batch(lengths, side, seed=0):
    """Per-sample tensors and the same samples padded into one batch."""
    T = max(lengths)
    per = [_sample(n, seed + i) for i, n in enumerate(lengths)]
    S = place_maps([p[0] for p in per], T, side)
    Tt = place_maps([p[1] for p in per], T, side)

    def pad(v):
        z = torch.zeros(T - v.numel(), dtype=v.dtype)
        return torch.cat([z, v]) if side == "left" else torch.cat([v, z])

    text = torch.stack([pad(p[2]) for p in per])
    vision = torch.stack([pad(p[3]) for p in per])
    valid = torch.stack([pad(torch.ones(n, dtype=torch.bool)) for n in lengths])
    return per, S, Tt, text, vision, valid


# ----------------------------------------------------------------------------- attention losses


@pytest.mark.parametrize("signal", ["t2v", "full"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_zero_for_identical_maps(signal, kind):
    _, S, _, text, vision, valid = _batch([7, 6], "left")
    loss = attention_loss(signal, kind, S, S.clone(), text=text, vision=vision, valid=valid)
    assert loss.shape == (2,)
    assert loss.abs().max().item() < 1e-6


def test_t2v_mse_is_the_textbook_formula():
    S, Tm, text, vision = _sample(8, 1)
    X = text.nonzero().flatten().tolist()
    V = vision.nonzero().flatten().tolist()
    ref = sum((S[i, j] - Tm[i, j]) ** 2 for i in X for j in V) / (len(X) * len(V))
    got = t2v_mse(S[None], Tm[None], text[None], vision[None])
    torch.testing.assert_close(got, ref.reshape(1))
    assert got.item() > 0


def test_full_mse_per_query_is_mean_over_keys_then_queries():
    S, Tm, _, _ = _sample(6, 2)
    T = 6
    per_query = [sum((S[i, j] - Tm[i, j]) ** 2 for j in range(i + 1)) / (i + 1) for i in range(T)]
    ref = sum(per_query) / T
    got = full_attention_mse(S[None], Tm[None], torch.ones(1, T, dtype=torch.bool), reduction="per-query")
    torch.testing.assert_close(got, ref.reshape(1))
    # The authors' reduction (the default): plain mean over all T x T entries.
    got_ref = full_attention_mse(S[None], Tm[None], torch.ones(1, T, dtype=torch.bool))
    torch.testing.assert_close(got_ref, F.mse_loss(S, Tm).reshape(1))
    assert not torch.allclose(got, got_ref)


def test_cosine_is_one_minus_cosine_similarity_and_scale_invariant():
    S, Tm, text, vision = _sample(9, 3)
    block = text[:, None] & vision[None, :]
    ref = 1 - F.cosine_similarity(S[block], Tm[block], dim=0)
    torch.testing.assert_close(t2v_cosine(S[None], Tm[None], text[None], vision[None]), ref.reshape(1), atol=1e-6, rtol=1e-5)
    valid = torch.ones(1, 9, dtype=torch.bool)
    tril = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(full_attention_cosine(S[None], Tm[None], valid), (1 - F.cosine_similarity(S[tril], Tm[tril], dim=0)).reshape(1))
    assert full_attention_cosine(S[None], 3 * S[None], valid).abs().item() < 1e-6


@pytest.mark.parametrize("signal", ["t2v", "full"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["entries", "per-query"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_samples_alone(signal, kind, reduction, side):
    """Targets placed at each sample's offset: the batch loss of a sample is its unpadded loss."""
    per, S, Tt, text, vision, valid = _batch([9, 5, 7], side)
    batch = attention_loss(signal, kind, S, Tt, text=text, vision=vision, valid=valid, reduction=reduction)
    for b, (s, t, x, v) in enumerate(per):
        alone = attention_loss(signal, kind, s[None], t[None], text=x[None], vision=v[None],
                               valid=torch.ones(1, s.shape[0], dtype=torch.bool), reduction=reduction)
        torch.testing.assert_close(batch[b], alone[0])


@pytest.mark.parametrize("signal", ["t2v", "full"])
def test_entries_outside_the_masks_do_not_count(signal):
    _, S, Tt, text, vision, valid = _batch([9, 5], "left")
    base = attention_loss(signal, "mse", S, Tt, text=text, vision=vision, valid=valid)
    noisy = Tt.clone()
    pad_rows = ~valid[:, :, None] | ~valid[:, None, :]
    noisy[pad_rows] = 5.0  # garbage on padding rows and columns
    if signal == "full":
        noisy += 7.0 * torch.ones(9, 9).triu(1)  # and above the diagonal (not a valid entry)
    else:
        noisy[~(text[:, :, None] & vision[:, None, :])] = 3.0  # and everywhere outside X x V
    torch.testing.assert_close(attention_loss(signal, "mse", S, noisy, text=text, vision=vision, valid=valid), base)
    # ... while a change inside the mask does count.
    inside = Tt.clone()
    inside[1, -1, -2] += 0.5 if signal == "full" else 0.0
    if signal == "t2v":
        i = text[1].nonzero()[-1].item()
        j = vision[1].nonzero()[0].item()
        inside[1, i, j] += 0.5
    assert attention_loss(signal, "mse", S, inside, text=text, vision=vision, valid=valid)[1] > base[1]


def test_place_maps_offsets():
    a, b = torch.ones(2, 2), 2 * torch.ones(3, 3)
    left = place_maps([a, b], 3, "left")
    assert left[0, 1:, 1:].eq(1).all() and left[0, 0].eq(0).all() and left[0, :, 0].eq(0).all()
    right = place_maps([a, b], 3, "right")
    assert right[0, :2, :2].eq(1).all() and right[0, 2].eq(0).all() and right[0, :, 2].eq(0).all()
    assert left[1].eq(2).all() and right[1].eq(2).all()
    with pytest.raises(ValueError):
        place_maps([torch.ones(4, 4)], 3, "left")


# ----------------------------------------------------------------------------- CE


def test_answer_ce_only_on_answer_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([1, 2, 3])
    labels[1, 4:6] = torch.tensor([4, 5])
    got = answer_ce(logits, labels)
    ref0 = F.cross_entropy(logits[0, 2:5], labels[0, 3:6])
    ref1 = F.cross_entropy(logits[1, 3:5], labels[1, 4:6])
    torch.testing.assert_close(got, torch.stack([ref0, ref1]))
    # Logits outside the answer span (minus one) do not matter.
    other = logits.clone()
    other[:, :2] = 100.0
    torch.testing.assert_close(answer_ce(other, labels), got)
    # Only the needed logits: the kept-positions path gives the same value.
    keep, targets = answer_positions(labels)
    assert keep.tolist() == [2, 3, 4]
    torch.testing.assert_close(token_ce(logits[:, keep], targets), got)
    # A perfect prediction has ~zero loss.
    perfect = torch.full((2, 6, 11), -30.0)
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != IGNORE_INDEX:
                perfect[b, t, labels[b, t + 1]] = 30.0
    assert answer_ce(perfect, labels).max().item() < 1e-6


def test_ce_without_answer_tokens_is_zero_not_nan():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss = answer_ce(logits, torch.full((1, 4), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- layers


def test_layer_group_matching_paper_example():
    # 24-layer student, 28-layer teacher, range 0..L-2: k=23, m=27, g=5.
    pairs = layer_groups(list(range(23)), list(range(27)))
    assert len(pairs) == 23
    assert all(len(ts) == 5 for _, ts in pairs)
    assert pairs[0] == (0, (0, 1, 2, 3, 4))
    assert pairs[10] == (10, (10, 11, 12, 13, 14))
    assert pairs[22] == (22, (22, 23, 24, 25, 26))
    # Equal depth: identity; a shallower teacher: g = 1, clamped to the last teacher layer.
    assert layer_groups([0, 1, 2], [5, 6, 7]) == [(0, (5,)), (1, (6,)), (2, (7,))]
    assert layer_groups([0, 1, 2, 3], [0, 1]) == [(0, (0,)), (1, (1,)), (2, (1,)), (3, (1,))]


def test_layer_specs_and_recipes():
    assert resolve_layers("L-2", 24) == [22] == resolve_layers("-2", 24)
    assert resolve_layers("0..L-2", 4) == [0, 1, 2]
    assert resolve_layers(mid_range_spec("mid2"), 24) == list(range(1, 22))  # 1..L-3
    assert resolve_layers(mid_range_spec("mid1"), 24) == list(range(0, 23))
    assert resolve_layers("0,2", 4) == [0, 2]
    for bad in ("7", "x", "3..1", "L-9"):
        with pytest.raises(LayerSpecError):
            resolve_layers(bad, 4)
    # L-N (or -N) with N > L is out of range, never wrapped round (L-9 on 6 layers once gave layer 3)
    assert resolve_layers("L-6", 6) == [0] == resolve_layers("-6", 6)
    for bad in ("L-9", "L-7", "-7", "L-7..L-2", "0..L-8"):
        with pytest.raises(LayerSpecError, match="out of range for a model with 6 decoder layers"):
            resolve_layers(bad, 6)
    # Recipes on the tiny pair (student 4 layers, teacher 6).
    assert plan_term("perception", 4, 6).pairs == ((0, (0,)),)
    plan = plan_term("planning", 4, 6)
    assert plan.pairs == ((2, (4,)),) and plan.signal == "t2v"
    reasoning = plan_term("reasoning", 4, 6)
    assert reasoning.signal == "full" and reasoning.pairs == ((0, (0, 1, 2)), (1, (1, 2, 3)), (2, (2, 3, 4)))
    assert reasoning.teacher_layers == [0, 1, 2, 3, 4]
    assert parse_role_layers("perception=0;planning=L-3", ["perception", "reasoning", "planning"]) == {"perception": "0", "planning": "L-3"}
    with pytest.raises(LayerSpecError, match="per role"):
        parse_role_layers("0", ["perception", "planning"])


@pytest.mark.parametrize("signal,kind", [("full", "mse"), ("t2v", "mse"), ("full", "cosine")])
def test_losses_keep_little_for_backward(signal, kind):
    """The attention maps are a step's biggest tensors: a loss keeps at most one fp32 (B, T, T)
    tensor per map it compares, plus bool masks (it kept three fp32 maps before)."""
    B, T = 2, 64
    student = torch.rand(B, T, T, requires_grad=True)
    teacher = torch.rand(B, T, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    text, vision = valid.clone(), torch.zeros(B, T, dtype=torch.bool)
    vision[:, :10] = True
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attention_loss(signal, kind, student, teacher, text=text, vision=vision, valid=valid).sum().backward()
    big = {t.data_ptr(): t for t in saved if t.numel() == B * T * T and t.dtype == torch.float32 and t is not student}
    assert len(big) <= (2 if kind == "cosine" else 1), [t.shape for t in big.values()]
