"""GradBuffers: per-loss rows written in place by autograd, the optimiser's gradients kept apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drivekd.projection import GradBuffers, combine


class TwoHeads(nn.Module):
    """trunk -> head_a (loss A) and trunk -> head_b (loss B); a frozen scale in the forward."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6).to(dtype)
        self.head_a = nn.Linear(6, 1).to(dtype)
        self.head_b = nn.Linear(6, 2).to(dtype)
        self.frozen = nn.Parameter(torch.ones(6, dtype=dtype), requires_grad=False)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x)) * self.frozen
        return self.head_a(h).pow(2).mean(), self.head_b(h).sin().sum()


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def autograd_row(model: TwoHeads, loss: torch.Tensor) -> torch.Tensor:
    ps = trainable(model)
    gs = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, ps)])


def test_rows_match_autograd_and_are_written_in_place():
    model = TwoHeads()
    bufs = GradBuffers(model.parameters(), num_rows=2)
    assert bufs.mode == "view"
    assert bufs.numel == sum(p.numel() for p in trainable(model))  # frozen excluded
    lo, hi = bufs.buffer.data_ptr(), bufs.buffer.data_ptr() + bufs.buffer.numel() * bufs.buffer.element_size()
    seen = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.data_ptr())) for p in trainable(model)]
    x = torch.randn(7, 5)
    la, lb = model.losses(x)
    ref_a, ref_b = autograd_row(model, la), autograd_row(model, lb)
    bufs.zero_()
    bufs.backward(0, la, retain_graph=True)
    bufs.backward(1, lb)
    for h in hooks:
        h.remove()
    assert seen and all(lo <= ptr < hi for ptr in seen), "autograd wrote a gradient outside the buffer"
    torch.testing.assert_close(bufs.buffer[0], ref_a)
    torch.testing.assert_close(bufs.buffer[1], ref_b)
    # loss A never reaches head_b: its slice of row 0 stays exactly zero
    o = bufs.offsets[[id(p) for p in bufs.params].index(id(model.head_b.weight))]
    assert torch.count_nonzero(bufs.buffer[0, o:]) == 0
    assert bufs.filled == (True, True)
    assert all(p.grad is None for p in model.parameters())  # left as found
    assert model.frozen.grad is None


def test_backward_overwrites_row_and_keeps_existing_grads():
    model = TwoHeads()
    bufs = GradBuffers(model.parameters(), num_rows=2)
    marker = [torch.full_like(p, 3.0) for p in trainable(model)]
    for p, m in zip(trainable(model), marker):
        p.grad = m
    x = torch.randn(4, 5)
    la, _ = model.losses(x)
    bufs.backward(0, la, retain_graph=True)
    bufs.backward(0, la)  # again: the row is overwritten, not accumulated
    torch.testing.assert_close(bufs.buffer[0], autograd_row(model, model.losses(x)[0]))
    assert all(p.grad is m and bool((m == 3).all()) for p, m in zip(trainable(model), marker))
    assert bufs.filled == (True, False)
    bufs.zero_()
    assert bufs.filled == (False, False) and torch.count_nonzero(bufs.buffer) == 0


@pytest.mark.parametrize("param_dtype, mode", [(torch.float32, "copy"), (torch.bfloat16, "view")])
def test_bf16_buffer(param_dtype, mode):
    """bf16 buffer: fp32 params take the copy path (cast after backward), bf16 params the view path."""
    model = TwoHeads(param_dtype)
    bufs = GradBuffers(model.parameters(), num_rows=2, dtype=torch.bfloat16)
    assert bufs.mode == mode
    x = torch.randn(7, 5, dtype=param_dtype)
    la, lb = model.losses(x)
    ref = [autograd_row(model, la), autograd_row(model, lb)]
    bufs.backward(0, la, retain_graph=True)
    bufs.backward(1, lb)
    for k in range(2):
        torch.testing.assert_close(bufs.buffer[k], ref[k].to(torch.bfloat16))
    assert all(p.grad is None for p in model.parameters())


def test_view_mode_needs_matching_dtype():
    with pytest.raises(ValueError, match="mode='copy'"):
        GradBuffers(TwoHeads().parameters(), 2, dtype=torch.bfloat16, mode="view")
    with pytest.raises(ValueError, match="no trainable parameter"):
        GradBuffers([nn.Parameter(torch.ones(2), requires_grad=False)], 2)
    model = TwoHeads()
    with pytest.raises(ValueError, match="does not require grad"):
        GradBuffers(model.parameters(), 2).backward(0, torch.tensor(1.0))


def test_accumulation_over_micro_steps():
    """The loop's pattern: rows per micro-step, combined into flat fp32 grads the .grad views point at."""
    model = TwoHeads()
    params = trainable(model)
    bufs = GradBuffers(params, num_rows=2)
    flat = torch.zeros(bufs.numel)
    views, o = [], 0
    for p in params:
        views.append(flat[o : o + p.numel()].view_as(p))
        o += p.numel()
    for p, v in zip(params, views):
        p.grad = v
    total = torch.zeros(bufs.numel)
    for step in range(2):
        x = torch.randn(3, 5)
        la, lb = model.losses(x)
        total += autograd_row(model, la) + autograd_row(model, lb)
        bufs.zero_()
        bufs.backward(0, la, retain_graph=True)
        bufs.backward(1, lb)
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(params, views))  # restored
        combine(bufs.buffer, "none", active=bufs.filled, accumulate_into=flat)
    torch.testing.assert_close(flat, total)
    la, lb = model.losses(torch.ones(2, 5))
    ref_b = autograd_row(model, lb)
    flat.zero_()
    bufs.zero_()
    bufs.backward(1, lb)
    combine(bufs.buffer, "agp", [1], active=bufs.filled, accumulate_into=flat)
    torch.testing.assert_close(flat, ref_b)  # row 0 unfilled -> absent


def test_unfilled_rows_are_absent_for_agp():
    model = TwoHeads()
    bufs = GradBuffers(model.parameters(), num_rows=3)
    la, lb = model.losses(torch.randn(6, 5))
    bufs.zero_()
    bufs.backward(0, la, retain_graph=True)
    bufs.backward(2, lb)
    assert bufs.filled == (True, False, True)
    got, info = combine(bufs.buffer, "agp", [2, 1], active=bufs.filled, return_info=True)
    sub = combine(torch.stack([bufs.buffer[0], bufs.buffer[2]]), "agp", [1])
    torch.testing.assert_close(got, sub)
    assert float(info["coef"][1]) == 0.0
