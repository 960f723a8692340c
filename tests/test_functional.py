"""Value tests for learnmask.functional (Louizos et al. 2018; Sanh et al. 2020; Jang 2017)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from learnmask import functional as F

DEFAULT = dict(temperature=F.BETA, stretch=(F.GAMMA, F.ZETA))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ case G1


def test_constants():
    assert F.BETA == 2 / 3 and F.GAMMA == -0.1 and F.ZETA == 1.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_g1_prob_nonzero_at_zero(dtype):
    p = F.prob_nonzero(torch.tensor(0.0, dtype=dtype))
    assert p.item() == pytest.approx(0.831822, abs=1e-6)
    assert p.item() == pytest.approx(1 / (1 + 11 ** (-2 / 3)), abs=1e-7)  # closed form


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_g1_deterministic_gate(dtype):
    gate = F.deterministic_gate(torch.tensor([0.0, 2.3979, 3.0, 10.0, -2.3979, -3.0, -10.0],
                                             dtype=dtype))
    assert gate[0].item() == 0.5
    assert gate[1:4].tolist() == [1.0, 1.0, 1.0]
    assert gate[4:].tolist() == [0.0, 0.0, 0.0]
    # just inside the open interval the gate is strictly between 0 and 1
    inner = F.deterministic_gate(torch.tensor([2.39, -2.39], dtype=dtype))
    assert 0.99 < inner[0].item() < 1.0 and 0.0 < inner[1].item() < 0.01


def test_cdf_at_zero_is_one_minus_prob_nonzero():
    log_alpha = torch.linspace(-5, 5, 11, dtype=torch.float64)
    for beta in (0.3, 2 / 3, 1.5):
        cdf0 = F.hard_concrete_cdf(0.0, log_alpha, temperature=beta, stretch=(-0.1, 1.1))
        pnz = F.prob_nonzero(log_alpha, temperature=beta, stretch=(-0.1, 1.1))
        torch.testing.assert_close(cdf0, 1 - pnz, rtol=0, atol=1e-12)


def test_cdf_limits_and_monotone():
    x = torch.tensor([-0.5, 0.0, 0.25, 0.5, 0.75, 0.999999, 1.0, 1.5], dtype=torch.float64)
    cdf = F.hard_concrete_cdf(x, torch.tensor(0.5, dtype=torch.float64), **DEFAULT)
    assert cdf[0].item() == 0.0 and cdf[-2].item() == 1.0 and cdf[-1].item() == 1.0
    assert torch.all(cdf[1:] >= cdf[:-1])
    assert cdf[-3].item() < 1.0  # jump to 1 (mass at z = 1) happens at x = 1
    # symmetric case: log_alpha = 0 and symmetric stretch give F(1/2) = 1/2
    assert F.hard_concrete_cdf(0.5, torch.tensor(0.0, dtype=torch.float64), **DEFAULT).item() == (
        pytest.approx(0.5, abs=1e-12))


def test_expected_l0_is_sum_and_differentiable():
    log_alpha = torch.tensor([[-1.0, 0.0], [2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    l0 = F.expected_l0(log_alpha)
    assert l0.shape == ()
    torch.testing.assert_close(l0, F.prob_nonzero(log_alpha).sum())
    assert torch.autograd.gradcheck(lambda a: F.expected_l0(a), (log_alpha,))
    (grad,) = torch.autograd.grad(l0, log_alpha)
    p = F.prob_nonzero(log_alpha.detach())
    torch.testing.assert_close(grad, p * (1 - p))  # d sigmoid


# ------------------------------------------------------------------------------ distribution


def _mass_at_one(log_alpha: float, beta: float) -> float:
    # left limit of the CDF at 1: sigmoid(β log((1-γ)/(ζ-1)) - log_alpha)
    return 1 - 1 / (1 + math.exp(-(beta * math.log(1.1 / 0.1) - log_alpha)))


@pytest.mark.parametrize("log_alpha,beta", [(0.0, 2 / 3), (1.5, 2 / 3), (-1.0, 0.5), (0.5, 1.2)])
def test_ks_continuous_part_and_point_masses(log_alpha, beta):
    n = 40_000
    la = torch.full((n,), log_alpha, dtype=torch.float64)
    z = F.hard_concrete_sample(la, temperature=beta, stretch=(F.GAMMA, F.ZETA), generator=_gen(0))
    la_t = torch.tensor(log_alpha, dtype=torch.float64)
    cdf = lambda x: F.hard_concrete_cdf(  # noqa: E731
        torch.as_tensor(x, dtype=torch.float64), la_t, temperature=beta, stretch=(F.GAMMA, F.ZETA)
    ).numpy()
    p0 = float(cdf(0.0))
    p1 = 1.0 - float(cdf(math.nextafter(1.0, 0.0)))
    assert p1 == pytest.approx(_mass_at_one(log_alpha, beta), abs=1e-9)
    for observed, expected in (((z == 0).double().mean().item(), p0),
                               ((z == 1).double().mean().item(), p1)):
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    inside = z[(z > 0) & (z < 1)].numpy()
    conditional = lambda x: (cdf(x) - p0) / (1 - p1 - p0)  # noqa: E731
    assert stats.kstest(inside, conditional).pvalue > 1e-3
    # the test has power: the CDF of another log_alpha is rejected
    wrong_t = torch.tensor(log_alpha + 0.3, dtype=torch.float64)
    wrong = lambda x: F.hard_concrete_cdf(  # noqa: E731
        torch.as_tensor(x, dtype=torch.float64), wrong_t, temperature=beta
    )
    w0, w1 = float(wrong(0.0)), 1 - float(wrong(math.nextafter(1.0, 0.0)))
    assert stats.kstest(inside, lambda x: (wrong(x).numpy() - w0) / (1 - w1 - w0)).pvalue < 1e-6


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.0, 3.0])
def test_expected_l0_matches_monte_carlo(log_alpha):
    n = 100_000
    la = torch.full((n,), log_alpha)
    z = F.hard_concrete_sample(la, generator=_gen(1))
    p = F.prob_nonzero(torch.tensor(log_alpha)).item()
    assert abs((z > 0).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert F.expected_l0(la).item() == pytest.approx(n * p, rel=1e-5)


def test_sample_reparameterised_gradient():
    log_alpha = torch.tensor([-0.3, 0.2, 0.7, 1.1], dtype=torch.float64, requires_grad=True)
    # fixed noise: u = 0.5 gives s = sigmoid(log_alpha / β) (no clipping for these values)
    fn = lambda a: F.hard_concrete_sample(a, generator=_gen(3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (log_alpha,))
    z = fn(log_alpha)
    assert z.requires_grad


def test_sample_uses_generator():
    la = torch.zeros(1000)
    a = F.hard_concrete_sample(la, generator=_gen(5))
    b = F.hard_concrete_sample(la, generator=_gen(5))
    c = F.hard_concrete_sample(la, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    log_alpha=st.floats(-20, 20),
    beta=st.floats(0.05, 3.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_sample_range_and_shape(shape, log_alpha, beta, dtype):
    la = torch.full(shape, log_alpha, dtype=dtype)
    z = F.hard_concrete_sample(la, temperature=beta, generator=_gen(0))
    assert z.shape == la.shape and z.dtype == dtype
    assert torch.all((z >= 0) & (z <= 1)) and not torch.isnan(z).any()


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    la = torch.zeros(3)
    for fn in (F.hard_concrete_sample, F.prob_nonzero, F.expected_l0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fn(la, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        F.gumbel_sigmoid(la, temperature=temperature)


@pytest.mark.parametrize("stretch", [(0.1, 1.1), (-0.1, 1.0), (-0.1, 0.9), (0.0, 1.1)])
def test_bad_stretch(stretch):
    la = torch.zeros(3)
    with pytest.raises(ValueError, match=r"gamma < 0 < 1 < zeta; got"):
        F.deterministic_gate(la, stretch=stretch)
    with pytest.raises(ValueError, match=r"gamma < 0 < 1 < zeta"):
        F.hard_concrete_sample(la, stretch=stretch)
    with pytest.raises(ValueError, match="pair"):
        F.prob_nonzero(la, stretch=(-0.1,))


# ------------------------------------------------------------------------------ top-k


def test_topk_mask_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])
    assert F.topk_mask(scores, 2).tolist() == [False, True, True, False, False, False]
    assert F.topk_mask(scores, 5).tolist() == [False, True, True, True, True, True]
    zeros = F.topk_mask(torch.zeros(2, 3), 4)
    assert zeros.dtype == torch.bool
    assert zeros.tolist() == [[True, True, True], [True, False, False]]


def test_topk_mask_over_all_elements():
    scores = torch.tensor([[0.0, 9.0, 8.0], [7.0, 1.0, 2.0]])
    assert F.topk_mask(scores, 3).tolist() == [[False, True, True], [True, False, False]]
    assert F.topk_mask(scores, 0).sum().item() == 0
    assert F.topk_mask(scores, 6).all()


@pytest.mark.parametrize("k", [-1, 7, 2.0, True])
def test_topk_mask_bad_k(k):
    with pytest.raises(ValueError, match=r"k.*\[0, 6\]"):
        F.topk_mask(torch.zeros(2, 3), k)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        F.straight_through_topk(torch.zeros(2, 3), k)


def test_topk_mask_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        F.topk_mask(torch.tensor([0.0, float("nan")]), 1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_topk_mask_property(data, shape):
    numel = math.prod(shape)
    values = data.draw(st.lists(st.integers(-2, 2), min_size=numel, max_size=numel))
    k = data.draw(st.integers(0, numel))
    scores = torch.tensor(values, dtype=torch.float32).reshape(shape)
    mask = F.topk_mask(scores, k)
    assert mask.shape == scores.shape and int(mask.sum()) == k
    expected = sorted(range(numel), key=lambda i: (-values[i], i))[:k]
    assert sorted(torch.nonzero(mask.flatten()).flatten().tolist()) == sorted(expected)


def test_straight_through_topk_forward_and_identity_grad():
    scores = torch.randn(3, 4, generator=_gen(0), requires_grad=True)
    upstream = torch.randn(3, 4, generator=_gen(1))
    out = F.straight_through_topk(scores, 5)
    assert torch.equal(out, F.topk_mask(scores, 5).float())
    (grad,) = torch.autograd.grad(out, scores, upstream)
    (surrogate_grad,) = torch.autograd.grad(scores * 1.0, scores, upstream)  # identity surrogate
    assert torch.equal(grad, surrogate_grad) and torch.equal(grad, upstream)


def test_straight_through_threshold_forward_and_sigmoid_grad():
    scores = torch.tensor([-2.0, -0.1, 0.0, 0.1, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    out = F.straight_through_threshold(scores, 0.5)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    (grad,) = torch.autograd.grad(out, scores, upstream)
    (surrogate_grad,) = torch.autograd.grad(torch.sigmoid(scores), scores, upstream)
    torch.testing.assert_close(grad, surrogate_grad, rtol=0, atol=0)
    s = torch.sigmoid(scores.detach())
    torch.testing.assert_close(grad, upstream * s * (1 - s))
    assert F.straight_through_threshold(scores, 0.9).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]; got 1.5"):
        F.straight_through_threshold(scores, 1.5)


# ------------------------------------------------------------------------------ Gumbel-sigmoid


def test_gumbel_sigmoid_soft_range_and_hard_probability():
    n = 100_000
    logits = torch.full((n,), 0.7)
    soft = F.gumbel_sigmoid(logits, temperature=0.5, generator=_gen(0))
    assert torch.all((soft >= 0) & (soft <= 1)) and soft.shape == logits.shape
    hard = F.gumbel_sigmoid(logits, temperature=0.5, hard=True, generator=_gen(0))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard, (soft > 0.5).float())  # same noise, hard = rounded soft
    p = 1 / (1 + math.exp(-0.7))
    assert abs(hard.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_gumbel_sigmoid_hard_is_straight_through():
    logits = torch.tensor([-1.0, 0.2, 1.5], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -1.0])
    hard = F.gumbel_sigmoid(logits, temperature=0.7, hard=True, generator=_gen(4))
    soft = F.gumbel_sigmoid(logits, temperature=0.7, generator=_gen(4))
    (g_hard,) = torch.autograd.grad(hard, logits, upstream)
    (g_soft,) = torch.autograd.grad(soft, logits, upstream)
    torch.testing.assert_close(g_hard, g_soft)
    assert g_soft.abs().sum() > 0
