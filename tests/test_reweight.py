"""Online loss re-weighting against a direct implementation of METHOD.md section 7 (with the Adam
update written out), plus the invariants: sum of weights, CE floor, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from drivekd.optim import DynamicWeights

NAMES = ["ce", "perception", "reasoning", "planning"]


def softplus(a: float) -> float:
    return math.log1p(math.exp(a))


def sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


class Direct:
    """The formulas, by hand: weights, target, the subgradient of sum |G_i - target_i|, AdamW
    (no weight decay), rescale to sum static, clamp, CE floor, a = log(expm1(w))."""

    def __init__(self, static, alpha=0.0, detach=True, lr=3e-4, betas=(0.9, 0.99), floor=0.6):
        self.static, self.alpha, self.detach, self.lr, self.b, self.floor = static, alpha, detach, lr, betas, floor
        self.a = [math.log(math.expm1(s)) for s in static]
        self.m = [0.0] * len(static)
        self.v = [0.0] * len(static)
        self.t = 0
        self.L0 = None

    def w(self, i: int) -> float:
        w = min(max(softplus(self.a[i]) + 1e-8, 1e-6), 1e6)
        return max(w, self.floor) if i == 0 else w

    def step(self, L, n):
        K = len(L)
        if self.L0 is None:
            self.L0 = list(L)
        w = [self.w(i) for i in range(K)]
        G = [w[i] * n[i] for i in range(K)]
        S = sum(G)
        p = [s / sum(self.static) for s in self.static]
        r = [L[i] / self.L0[i] for i in range(K)]
        rbar = sum(r) / K
        q = [p[i] * (r[i] / rbar) ** self.alpha for i in range(K)]  # target_i = q_i * S
        sgn = [math.copysign(1.0, G[i] - q[i] * S) if G[i] != q[i] * S else 0.0 for i in range(K)]
        dG = [n[i] * sigmoid(self.a[i]) * (0.0 if (i == 0 and w[0] == self.floor) else 1.0) for i in range(K)]
        if self.detach:
            grad = [sgn[j] * dG[j] for j in range(K)]
        else:
            coupling = sum(sgn[i] * q[i] for i in range(K))
            grad = [(sgn[j] - coupling) * dG[j] for j in range(K)]
        self.t += 1
        b1, b2 = self.b
        for j in range(K):
            self.m[j] = b1 * self.m[j] + (1 - b1) * grad[j]
            self.v[j] = b2 * self.v[j] + (1 - b2) * grad[j] ** 2
            mhat = self.m[j] / (1 - b1**self.t)
            vhat = self.v[j] / (1 - b2**self.t)
            self.a[j] -= self.lr * mhat / (math.sqrt(vhat) + 1e-8)
        w = [self.w(i) for i in range(K)]
        scale = sum(self.static) / sum(w)
        for i in range(K):
            wi = min(max(w[i] * scale, 1e-6), 1e6)
            if i == 0:
                wi = max(wi, self.floor)
            self.a[i] = math.log(math.expm1(wi))
        return [self.w(i) for i in range(K)]


STEPS = [
    ([2.0, 0.5, 0.8, 0.3], [1.0, 4.0, 0.5, 2.0]),
    ([1.8, 0.45, 0.9, 0.2], [1.2, 3.0, 0.7, 2.5]),
    ([1.5, 0.40, 0.7, 0.25], [0.9, 5.0, 0.4, 1.0]),
]


@pytest.mark.parametrize("alpha", [0.0, 1.5])
@pytest.mark.parametrize("detach", [True, False])
def test_matches_direct_formulas(alpha, detach):
    static = [1.0, 0.8, 0.5, 0.3]
    dw = DynamicWeights(NAMES, static, alpha=alpha, detach_target=detach)
    ref = Direct(static, alpha=alpha, detach=detach)
    assert dw.weights() == pytest.approx(static, rel=1e-6)
    for L, n in STEPS:
        got = dw.update(dict(zip(NAMES, L)), dict(zip(NAMES, n)))
        assert got == pytest.approx(ref.step(L, n), rel=2e-6)
        assert not dw.last_skipped
    assert dw.weights() != pytest.approx(static, rel=1e-6)  # the weights did move


def test_sum_of_weights_preserved_and_ce_floor():
    static = [1.0, 1.0, 1.0, 1.0]
    dw = DynamicWeights(NAMES, static, lr=0.05)  # large lr: the weights move visibly
    for _ in range(20):  # CE's gradient is small: its weight grows, the floor never binds
        w = dw.update(dict(zip(NAMES, [1.0] * 4)), dict(zip(NAMES, [0.1, 10.0, 1.0, 0.5])))
        assert sum(w) == pytest.approx(sum(static), rel=1e-5)
    assert w[0] > 1.2 and w[1] < 0.8
    # CE's gradient is much larger, so its weight is pushed down, but never below the floor
    dw = DynamicWeights(NAMES, [0.62, 1.0, 1.0, 1.0], lr=0.05)
    for _ in range(30):
        w = dw.update(dict(zip(NAMES, [1.0] * 4)), dict(zip(NAMES, [50.0, 0.1, 0.1, 0.1])))
        assert w[0] >= 0.6 - 1e-6
    assert w[0] == pytest.approx(0.6, abs=1e-6)


def test_resume_gives_identical_next_weights():
    static = [1.0, 0.8, 0.5, 0.3]
    full = DynamicWeights(NAMES, static)
    for L, n in STEPS[:2]:
        full.update(dict(zip(NAMES, L)), dict(zip(NAMES, n)))
    blob = io.BytesIO()
    torch.save(full.state_dict(), blob)
    blob.seek(0)
    resumed = DynamicWeights(NAMES, static)
    resumed.load_state_dict(torch.load(blob, weights_only=True))  # plain data only
    assert resumed.weights() == full.weights()
    L, n = STEPS[0]
    assert resumed.update(dict(zip(NAMES, L)), dict(zip(NAMES, n))) == full.update(dict(zip(NAMES, L)), dict(zip(NAMES, n)))
    with pytest.raises(ValueError, match="same teacher terms"):
        DynamicWeights(NAMES[:3], static[:3]).load_state_dict(full.state_dict())


def test_skips_and_validation():
    dw = DynamicWeights(NAMES[:2], [1.0, 1.0])
    before = dw.weights()
    assert dw.update({"ce": 1.0}, {"ce": 1.0}) == before and dw.last_skipped  # one loss: nothing to balance
    assert dw.update({"ce": 1.0, "perception": 1.0}, {"ce": 0.0, "perception": 0.0}) == before and dw.last_skipped
    with pytest.raises(ValueError, match="leave a zero-weight term out"):
        DynamicWeights(NAMES[:2], [1.0, 0.0])
    with pytest.raises(ValueError, match="unknown loss name"):
        dw.update({"cee": 1.0}, {"cee": 1.0})
    with pytest.raises(ValueError, match="2 loss names but 1"):
        DynamicWeights(NAMES[:2], [1.0])
