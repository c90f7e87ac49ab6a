"""combine(): equal to a textbook full-vector implementation (fp64), and the properties METHOD.md
section 6 states. The textbook projects whole vectors one at a time, exactly as written there."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from drivekd.projection import METHODS, combine, gram

C = importlib.import_module("drivekd.projection.combine")  # the module (the package re-exports the function)

EPS = 1e-12


# ----------------------------------------------------------------------------- textbook


def t_proj(f: torch.Tensor, a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """proj(f, a) = f - min(0, <f, a>) / (||a||^2 + eps) * a, on full fp64 vectors."""
    return f - min(0.0, float(f @ a)) / (float(a @ a) + eps) * a


def t_symmetric(vecs: dict[int, torch.Tensor], perm) -> torch.Tensor:
    total = torch.zeros_like(next(iter(vecs.values())))
    for i in perm:
        t = vecs[i]
        for j in perm:
            if j != i:
                t = t_proj(t, vecs[j])
        total = total + t
    return total


def textbook(B: torch.Tensor, method: str, order) -> torch.Tensor:
    g = [row for row in B.double()]
    K = len(g)
    if method == "none":
        return sum(g)
    if method == "agp":
        return t_symmetric({k: g[0] + t_proj(g[k], g[0]) for k in range(1, K)}, order)
    if method == "g2":
        return t_symmetric({k: t_proj(g[0], g[k]) + t_proj(g[k], g[0]) for k in range(1, K)}, order)
    return t_symmetric(dict(enumerate(g)), (0, *order))


def assert_matches(vec: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(float(ref.abs().max()), 1.0)
    torch.testing.assert_close(vec.double(), ref, rtol=1e-5, atol=1e-5 * scale)


def correlated(K: int, N: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Rows with strong (and sign-mixed) correlations, so projections really fire."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64)
    base = torch.randn(K, N, generator=g, dtype=torch.float64)
    return (mix @ base + 0.3 * torch.randn(K, N, generator=g, dtype=torch.float64)).to(dtype)


def perms(K: int):
    return [list(p) for p in itertools.permutations(range(1, K))]


@pytest.fixture(params=["default", "small-chunks"])
def chunking(request, monkeypatch):
    """Run with the shipped chunk sizes and with tiny ones (many blocks and chunks, ragged tails)."""
    if request.param == "small-chunks":
        monkeypatch.setattr(C, "_CPU_BLOCK", 48)
        monkeypatch.setattr(C, "_CPU_CHUNK", 200)
    return request.param


# ----------------------------------------------------------------------------- equality with the textbook


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_random_matches_textbook(method, K, dtype, chunking):
    fired = 0
    for seed in range(3):
        B = correlated(K, 1001, seed, dtype)
        for order in perms(K):
            vec, info = combine(B, method, order, return_info=True)
            assert vec.dtype == torch.float32 and vec.shape == (1001,)
            # bf16 rows: the reference runs on the same (upcast) bf16 values
            assert_matches(vec, textbook(B, method, order))
            fired += int(info["fired"])
    if method != "none":
        assert fired > 0, "inputs too benign: no projection fired, the comparison proves little"


def test_long_rows_use_blocks_and_tail():
    # N above the shipped block and chunk sizes, not a multiple of either.
    for dtype in (torch.float32, torch.bfloat16):
        B = correlated(4, (1 << 17) + 12345, 7, dtype)
        for method in METHODS:
            assert_matches(combine(B, method, [3, 1, 2]), textbook(B, method, [3, 1, 2]))


def adversarial_cases():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(512, generator=g)
    b = torch.randn(512, generator=g)
    c = torch.randn(512, generator=g)
    z = torch.zeros(512)
    # Scalings by -1, 2, -2, 0.5 are exact in fp32 and bf16, so the textbook sees exact relations.
    return {
        "parallel": [a, 2 * a, 0.5 * a, a],
        "anti-parallel": [a, -a, -2 * a, 0.5 * a],
        "anti-to-anchor-mixed": [a, -a, b, -0.5 * b],
        "zero-anchor": [z, a, -a, b],
        "zero-follower": [a, z, -a, b],
        "all-zero": [z, z, z, z],
        "orthogonal-ish": [a, b, c, -a],
        "one-row-conflicts-all": [a, b, -(a + b), c],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(adversarial_cases()))
def test_adversarial_matches_textbook(case, dtype):
    rows = adversarial_cases()[case]
    for K in (2, 3, 4):
        B = torch.stack(rows[:K]).to(dtype)
        for method in METHODS:
            for order in perms(K):
                vec = combine(B, method, order)
                assert torch.isfinite(vec).all()
                assert_matches(vec, textbook(B, method, order))


def test_numerically_zero_merged_vector_is_ignored():
    """G2 with g_1 = -3 g_sup: the merged pair c_1 = proj(g_sup, g_1) + proj(g_1, g_sup) is zero as
    a vector while its coefficients (~(4, 4/3)) are not, so c^T G c is rounding noise of the fp32
    Gram (the rows' entries are large integers: the Gram is inexact, -3 g_sup is exact). Projecting
    c_2 onto it must be a no-op, as it is for the full vectors; without the zero test a negative
    noise would divide by ~eps and blow the result up."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        g0 = torch.randint(-1000, 1000, (2000,), generator=g).float()
        g2 = 100 * torch.randn(2000, generator=g)
        g3 = 100 * torch.randn(2000, generator=g)
        for B in (torch.stack([g0, -3 * g0, g2]), torch.stack([g0, -3 * g0, g2, g3])):
            for order in perms(B.shape[0]):
                assert_matches(combine(B, "g2", order), textbook(B, "g2", order))
    # AGP flavour: zero anchor, g_2 = -3 g_1, so stage 2 makes t_1 ~ 0 with non-zero coefficients
    # before projecting it onto m_3.
    for seed in range(6):
        g = torch.Generator().manual_seed(100 + seed)
        g1 = torch.randint(-1000, 1000, (2000,), generator=g).float()
        B = torch.stack([torch.zeros(2000), g1, -3 * g1, 100 * torch.randn(2000, generator=g)])
        for method in ("agp", "g1", "g2"):
            for order in perms(4):
                assert_matches(combine(B, method, order), textbook(B, method, order))


# ----------------------------------------------------------------------------- properties


def nonconflicting(K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(K, 700, generator=g) * torch.rand(K, 1, generator=g)  # all entries >= 0


@pytest.mark.parametrize("K", [2, 3, 4])
def test_no_conflict(K):
    """All pairwise dots >= 0 -> nothing fires. G1 = none. AGP = G2 = none + (K-2) g_sup (stage 1
    gives m_k = g_sup + g_k and stage 2 has nothing to remove, so g_sup is counted once per teacher
    term), hence AGP = none exactly when K = 2."""
    B = nonconflicting(K, K)
    none = combine(B, "none")
    for method in ("agp", "g1", "g2"):
        vec, info = combine(B, method, list(range(1, K)), return_info=True)
        assert int(info["fired"]) == 0
        expect = none if method == "g1" else none + (K - 2) * B[0]
        torch.testing.assert_close(vec, expect, rtol=1e-6, atol=1e-5)
        if method != "g1":
            torch.testing.assert_close(info["coef"], torch.tensor([K - 1.0] + [1.0] * (K - 1), dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_agp_stage1_keeps_anchor(seed):
    """Stage 1 never changes the anchor: m_k = 1*g_k + (1 + s_k) g_sup with s_k >= 0 (only the
    follower's conflicting component is removed, i.e. a multiple of g_sup added), and afterwards no
    projected follower m_k - g_sup has a negative inner product with g_sup."""
    # fp64 end to end: the check below is exact up to fp64 rounding. With fp32 rows the Gram is
    # accumulated in fp32 blocks (relative error ~1e-6 of |g_1||g_0| at N = 800), and the removed
    # component's residual <follower, g_0> can exceed 1e-6 |follower||g_0| once the follower is
    # much shorter than g_1 (seed 0 measured -3.75e-3 against a bound of -3.6e-3).
    B = correlated(4, 800, seed).double()
    B[1] -= 3 * B[0]  # make sure at least one follower conflicts with the anchor
    _, info = combine(B, "agp", [1, 2, 3], return_info=True)
    M = info["merged"]  # (3, 4) coefficients of m_1..m_3
    for k in range(1, 4):
        c = M[k - 1]
        assert float(c[k]) == 1.0
        assert all(float(c[j]) == 0.0 for j in range(1, 4) if j != k)
        assert float(c[0]) >= 1.0
        follower = (c - torch.eye(4, dtype=torch.float64)[0]) @ B.double()
        g0 = B[0].double()
        assert float(follower @ g0) >= -1e-6 * float(follower.norm() * g0.norm())
    assert float(M[0, 0]) > 1.0  # the conflict was really removed
    # Only stage 1 conflicts (follower 1 against the anchor; the m_k agree): lambda = sum_k m_k,
    # and row 0's coefficient is K-1 plus what stage 1 added.
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(4, 800, generator=g)  # non-negative rows: no pairwise conflict among them
    c = float(pos[1] @ pos[0] / (pos[0] @ pos[0]))
    follower = pos[1] - 1.8 * c * pos[0]  # <follower, g_sup> = -0.8 <pos_1, pos_0> < 0
    B2 = torch.stack([pos[0], follower, pos[2], pos[3]])
    _, info2 = combine(B2, "agp", [2, 1, 3], return_info=True)
    assert int(info2["fired"]) == 1
    torch.testing.assert_close(info2["coef"], info2["merged"].sum(0))
    assert float(info2["coef"][0]) > 3.0 and info2["coef"][1:].tolist() == [1.0, 1.0, 1.0]


def test_gram_and_info():
    B = correlated(3, 999, 1)
    G = gram(B)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, B.double() @ B.double().T, rtol=1e-6, atol=1e-6)
    vec, info = combine(B, "agp", [2, 1], return_info=True)
    torch.testing.assert_close(info["gram"], G)
    torch.testing.assert_close(vec.double(), info["coef"] @ B.double(), rtol=1e-6, atol=1e-5)
    assert info["order"] == (2, 1)
    assert combine(B, "none", return_info=True)[1]["merged"] is None


def test_default_order_uses_torch_global_generator():
    B = correlated(4, 300, 2)
    torch.manual_seed(123)
    drawn = (torch.randperm(3) + 1).tolist()
    torch.manual_seed(123)
    vec, info = combine(B, "agp", return_info=True)
    assert list(info["order"]) == drawn
    torch.testing.assert_close(vec, combine(B, "agp", drawn))


@pytest.mark.parametrize("method", METHODS)
def test_inactive_rows_are_absent(method):
    """An inactive row (skipped loss) behaves as if it were not in the buffer, even with garbage."""
    B = correlated(4, 600, 5)
    B[2] = 1e3 * torch.randn(600)  # garbage, finite
    vec = combine(B, method, [3, 2, 1], active=[True, True, False, True])
    sub = combine(B[[0, 1, 3]], method, [2, 1])  # rows renumbered: 3 -> 2
    torch.testing.assert_close(vec, sub, rtol=1e-5, atol=1e-4)
    # an inactive anchor: AGP/G2 see g_sup = 0
    vec0 = combine(B, method, [1, 3, 2], active=torch.tensor([False, True, True, True]))
    B0 = B.clone()
    B0[0] = 0
    torch.testing.assert_close(vec0, combine(B0, method, [1, 3, 2]), rtol=1e-5, atol=1e-4)


def test_accumulate_into_and_dtypes():
    B = correlated(3, 1500, 9)
    out = torch.randn(1500)
    before = out.clone()
    res = combine(B, "agp", [1, 2], accumulate_into=out)
    assert res is out
    torch.testing.assert_close(out, before + combine(B, "agp", [1, 2]))
    vb = combine(B.bfloat16(), "g2", [2, 1])
    assert vb.dtype == torch.float32
    vd = combine(B.double(), "g2", [2, 1])
    assert vd.dtype == torch.float64
    torch.testing.assert_close(vd, textbook(B.double(), "g2", [2, 1]), rtol=1e-10, atol=1e-10)
    outb = torch.zeros(1500)
    combine(B.bfloat16(), "g1", [2, 1], accumulate_into=outb)
    torch.testing.assert_close(outb, vb.new_zeros(1500) + combine(B.bfloat16(), "g1", [2, 1]))
    # rows may be a view with a row stride > N (e.g. the first rows of a larger buffer)
    big = correlated(4, 1500, 9)
    torch.testing.assert_close(combine(big[:3], "agp", [2, 1]), combine(big[:3].clone(), "agp", [2, 1]))


def test_logic_never_reads_tensors_on_the_host(monkeypatch):
    """No .item()/bool()/float()/tolist() inside combine when order is given: on CUDA each would
    be a host sync per projection."""
    B = correlated(4, 400, 4)

    def boom(*_a, **_k):
        raise AssertionError("host read of a tensor value inside combine")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for method in METHODS:
        combine(B, method, [2, 3, 1], active=[True, True, True, True], return_info=True)
        combine(B.bfloat16(), method, (3, 1, 2))
    monkeypatch.undo()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grads=torch.zeros(1, 5), method="agp"), "2 to 4 rows"),
        (dict(grads=torch.zeros(5, 5), method="agp"), "2 to 4 rows"),
        (dict(grads=torch.zeros(3), method="agp"), r"shape \(K, N\)"),
        (dict(grads=torch.zeros(3, 0), method="agp"), "no columns"),
        (dict(grads=torch.zeros(3, 5, dtype=torch.int32), method="agp"), "fp32"),
        (dict(grads=torch.zeros(5, 3).T, method="agp"), "contiguous"),
        (dict(grads=torch.zeros(3, 5), method="pcgrad"), "method must be one of"),
        (dict(grads=torch.zeros(3, 5), method="agp", order=[1, 1]), "permutation"),
        (dict(grads=torch.zeros(3, 5), method="agp", order=[0, 1]), "permutation"),
        (dict(grads=torch.zeros(3, 5), method="agp", order=[1, 2, 3]), "permutation"),
        (dict(grads=torch.zeros(3, 5), method="agp", order=[1.5, 2]), "ints"),
        (dict(grads=torch.zeros(3, 5), method="agp", eps=-1.0), "eps"),
        (dict(grads=torch.zeros(3, 5), method="agp", active=[True, False]), "one boolean per row"),
        (dict(grads=torch.zeros(3, 5), method="agp", accumulate_into=torch.zeros(4)), "shape"),
        (dict(grads=torch.zeros(3, 5), method="agp", accumulate_into=torch.zeros(5, dtype=torch.float64)), "float32"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        combine(**kwargs)
