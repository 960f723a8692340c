"""Pure math for learnable masks: hard-concrete, straight-through and Gumbel-sigmoid gates.

No modules and no state here; :mod:`learnmask.gates` wraps these functions in ``nn.Module``s.

Shape legend used in every docstring of this file:
    ``*``  any shape, including ``()``; outputs keep the shape of ``log_alpha`` / ``scores`` /
           ``logits``.
    ``N``  number of elements of that shape (``numel``).

Value conventions: ``temperature`` (β or τ) is a positive float; ``stretch`` is the pair (γ, ζ)
with γ < 0 < 1 < ζ; gate values ``z`` lie in [0, 1]; probabilities lie in [0, 1].

Sources:
    Louizos, Welling & Kingma (2018), "Learning Sparse Neural Networks through L0
    Regularization" (hard-concrete, expected L0, deterministic test-time gate).
    Maddison, Mnih & Teh (2017), "The Concrete Distribution"; Jang, Gu & Poole (2017),
    "Categorical Reparameterization with Gumbel-Softmax" (binary concrete / Gumbel-sigmoid).
    Sanh, Wolf & Rush (2020), "Movement Pruning: Adaptive Sparsity by Fine-Tuning"
    (straight-through top-k and threshold masks).
    Bengio, Léonard & Courville (2013), "Estimating or Propagating Gradients Through Stochastic
    Neurons" (straight-through estimator).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from learnmask.sampling import generator_for

__all__ = [
    "BETA",
    "GAMMA",
    "ZETA",
    "hard_concrete_sample",
    "hard_concrete_cdf",
    "prob_nonzero",
    "expected_l0",
    "deterministic_gate",
    "topk_mask",
    "straight_through_topk",
    "straight_through_threshold",
    "gumbel_sigmoid",
]

#: Hard-concrete temperature β (Louizos et al. 2018, Sec. 4).
BETA: float = 2.0 / 3.0
#: Lower stretch limit γ (Louizos et al. 2018).
GAMMA: float = -0.1
#: Upper stretch limit ζ (Louizos et al. 2018).
ZETA: float = 1.1

#: Uniform noise is drawn from U(_EPS, 1 - _EPS) so that its logit stays finite.
_EPS: float = 1e-6


# ----------------------------------------------------------------------------- validation


def _check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float; raise ValueError unless it is a finite number > 0."""
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return value


def _check_stretch(stretch: tuple[float, float]) -> tuple[float, float]:
    """Return ``stretch`` as ``(gamma, zeta)`` floats; raise ValueError unless γ < 0 < 1 < ζ."""
    try:
        gamma, zeta = (float(v) for v in stretch)
    except (TypeError, ValueError):
        raise ValueError(
            f"stretch must be a pair (gamma, zeta) of floats; got {stretch!r}"
        ) from None
    if not (gamma < 0.0 < 1.0 < zeta and math.isfinite(gamma) and math.isfinite(zeta)):
        raise ValueError(
            f"stretch (gamma, zeta) must satisfy gamma < 0 < 1 < zeta; got ({gamma}, {zeta})"
        )
    return gamma, zeta


def _check_k(k: int, scores: Tensor) -> int:
    """Return ``k`` as an int; raise ValueError unless 0 <= k <= scores.numel()."""
    numel = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int):
        if isinstance(k, Tensor) and k.numel() == 1 and not k.is_floating_point():
            k = int(k.item())
        else:
            raise ValueError(f"k must be an int in [0, numel] = [0, {numel}]; got {k!r}")
    if not 0 <= k <= numel:
        raise ValueError(
            f"k={k} is outside [0, numel] = [0, {numel}] for scores of shape {tuple(scores.shape)}"
        )
    return k


def _uniform_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """u ~ U(_EPS, 1 - _EPS) with the shape, dtype and device of ``like``; ``generator`` None: the
    training step's shared generator inside :func:`learnmask.sampling.step_sampling`, else torch's
    global one."""
    if generator is None:
        generator = generator_for(like.device)
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return u.clamp(_EPS, 1.0 - _EPS)


def _stretch(s: Tensor, gamma: float, zeta: float) -> Tensor:
    """s̄ = s (ζ - γ) + γ, written as s ζ + (1 - s) γ so that s = 1/2 maps to exactly 1/2 in
    float32/float64 with the default (γ, ζ) (ζ - γ = 1.2 is not exact in binary)."""
    return s * zeta + (1.0 - s) * gamma


# ----------------------------------------------------------------------------- hard concrete


def hard_concrete_sample(
    log_alpha: Tensor,
    *,
    temperature: float = BETA,
    stretch: tuple[float, float] = (GAMMA, ZETA),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw a reparameterised hard-concrete sample z (Louizos, Welling & Kingma 2018, Eq. 10).

    u ~ U(ε, 1-ε);  s = sigmoid((log u - log(1-u) + log_alpha) / β);
    z = clamp(s (ζ - γ) + γ, 0, 1).

    Args:
        log_alpha: ``(*)`` location parameters, any real values.
        temperature: β > 0 (default 2/3).
        stretch: (γ, ζ) with γ < 0 < 1 < ζ (default (-0.1, 1.1)).
        generator: optional ``torch.Generator`` on the device of ``log_alpha``.

    Returns:
        ``(*)`` z in [0, 1], same dtype and device as ``log_alpha``; differentiable in
        ``log_alpha`` (zero gradient where clipped). Exact 0 and 1 occur with positive mass.

    Raises:
        ValueError: temperature <= 0, or stretch not satisfying γ < 0 < 1 < ζ.
    """
    beta = _check_temperature(temperature)
    gamma, zeta = _check_stretch(stretch)
    u = _uniform_noise(log_alpha, generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return _stretch(s, gamma, zeta).clamp(0.0, 1.0)


def hard_concrete_cdf(
    x: Tensor | float,
    log_alpha: Tensor | float,
    *,
    temperature: float = BETA,
    stretch: tuple[float, float] = (GAMMA, ZETA),
) -> Tensor:
    """Analytic CDF P(z <= x) of the stretched-and-clipped hard-concrete z (Louizos et al. 2018).

    For 0 <= x < 1 this equals P(s̄ <= x) for the pre-clip stretched sample s̄ = s (ζ-γ) + γ:
        F(x) = sigmoid(β · logit((x - γ)/(ζ - γ)) - log_alpha).
    F jumps at 0 (mass P(z = 0) = F(0)) and at 1 (mass P(z = 1) = 1 - F(1⁻)); F(x) = 0 for
    x < 0 and F(x) = 1 for x >= 1.

    Args:
        x: ``(*)`` points (float or tensor); broadcast against ``log_alpha``.
        log_alpha: ``(*)`` location parameters.
        temperature: β > 0.
        stretch: (γ, ζ) with γ < 0 < 1 < ζ.

    Returns:
        Broadcast shape of ``x`` and ``log_alpha``; values in [0, 1]; differentiable in
        ``log_alpha`` and in ``x`` inside [0, 1).

    Raises:
        ValueError: temperature <= 0, or bad stretch.
    """
    beta = _check_temperature(temperature)
    gamma, zeta = _check_stretch(stretch)
    log_alpha = torch.as_tensor(log_alpha)
    if not isinstance(x, Tensor) and log_alpha.is_floating_point():
        x = torch.tensor(x, dtype=log_alpha.dtype)  # Python numbers take log_alpha's dtype
    x = torch.as_tensor(x, device=log_alpha.device)
    dtype = torch.promote_types(x.dtype, log_alpha.dtype)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    x, log_alpha = x.to(dtype), log_alpha.to(dtype)
    y = (x.clamp(0.0, 1.0) - gamma) / (zeta - gamma)  # in (0, 1) strictly, so logit is finite
    inside = torch.sigmoid(beta * (torch.log(y) - torch.log1p(-y)) - log_alpha)
    ones, zeros = torch.ones_like(inside), torch.zeros_like(inside)
    return torch.where(x >= 1.0, ones, torch.where(x < 0.0, zeros, inside))


def prob_nonzero(
    log_alpha: Tensor,
    *,
    temperature: float = BETA,
    stretch: tuple[float, float] = (GAMMA, ZETA),
) -> Tensor:
    """P(z != 0) = 1 - F(0) = sigmoid(log_alpha - β log(-γ/ζ)) (Louizos et al. 2018, Eq. 12).

    Args:
        log_alpha: ``(*)`` location parameters.
        temperature: β > 0.
        stretch: (γ, ζ) with γ < 0 < 1 < ζ.

    Returns:
        ``(*)`` probabilities in [0, 1]; differentiable in ``log_alpha``. With the defaults,
        log_alpha = 0 gives 0.831822.

    Raises:
        ValueError: temperature <= 0, or bad stretch.
    """
    beta = _check_temperature(temperature)
    gamma, zeta = _check_stretch(stretch)
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def expected_l0(
    log_alpha: Tensor,
    *,
    temperature: float = BETA,
    stretch: tuple[float, float] = (GAMMA, ZETA),
) -> Tensor:
    """Expected number of non-zero gates, Σ P(z != 0) (Louizos et al. 2018, Eq. 12).

    Args:
        log_alpha: ``(*)`` location parameters (N elements).
        temperature: β > 0.
        stretch: (γ, ζ) with γ < 0 < 1 < ζ.

    Returns:
        ``()`` scalar in [0, N]; differentiable in ``log_alpha``.

    Raises:
        ValueError: temperature <= 0, or bad stretch.
    """
    return prob_nonzero(log_alpha, temperature=temperature, stretch=stretch).sum()


def deterministic_gate(
    log_alpha: Tensor, *, stretch: tuple[float, float] = (GAMMA, ZETA)
) -> Tensor:
    """Test-time gate ẑ = clamp(sigmoid(log_alpha)(ζ - γ) + γ, 0, 1) (Louizos et al. 2018, Eq 13).

    Also the evaluation gate of CoFi (Xia, Zhong & Chen 2022). With the default stretch,
    log_alpha = 0 gives exactly 0.5, log_alpha >= log(11) ≈ 2.3979 gives 1 and
    log_alpha <= -log(11) gives 0.

    Args:
        log_alpha: ``(*)`` location parameters.
        stretch: (γ, ζ) with γ < 0 < 1 < ζ.

    Returns:
        ``(*)`` values in [0, 1], same dtype as ``log_alpha``.

    Raises:
        ValueError: bad stretch.
    """
    gamma, zeta = _check_stretch(stretch)
    return _stretch(torch.sigmoid(log_alpha), gamma, zeta).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- top-k / threshold


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the ``k`` largest entries over ALL elements of ``scores``.

    Ties are broken deterministically: among equal scores the lower flat (row-major) index is
    kept first. Used by movement pruning (Sanh, Wolf & Rush 2020).

    Args:
        scores: ``(*)`` real scores (N elements), no NaN.
        k: number of entries to keep, int in [0, N].

    Returns:
        ``(*)`` bool tensor with exactly ``k`` True entries, on the device of ``scores``.
        Call ``.float()`` (or ``.to(dtype)``) for a 0/1 mask.

    Raises:
        ValueError: k not an int in [0, N] (message names both), or NaN in ``scores``.
    """
    k = _check_k(k, scores)
    flat = rearrange(scores.detach(), "... -> (...)")
    if torch.isnan(flat).any():
        raise ValueError(f"scores of shape {tuple(scores.shape)} contain NaN; expected real values")
    order = torch.argsort(flat, descending=True, stable=True)  # stable: equal -> lower index first
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


class _StraightThroughTopK(torch.autograd.Function):
    """Forward: 0/1 top-k mask; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int) -> Tensor:  # noqa: D102
        return topk_mask(scores, k).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad_output, None


def straight_through_topk(scores: Tensor, k: int) -> Tensor:
    """Hard top-k mask with a straight-through (identity) gradient (Sanh, Wolf & Rush 2020).

    Forward: ``topk_mask(scores, k)`` as a 0/1 float mask. Backward: d out / d scores = I, i.e.
    the incoming gradient is passed to ``scores`` unchanged (Bengio et al. 2013).

    Args:
        scores: ``(*)`` floating-point scores (N elements).
        k: entries to keep, int in [0, N].

    Returns:
        ``(*)`` 0/1 mask in the dtype of ``scores`` with exactly ``k`` ones.

    Raises:
        ValueError: k outside [0, N], or NaN in ``scores``.
    """
    _check_k(k, scores)  # raise before autograd wraps the error
    return _StraightThroughTopK.apply(scores, k)


def straight_through_threshold(scores: Tensor, threshold: float = 0.5) -> Tensor:
    """Hard threshold of sigmoid(scores) with a sigmoid-surrogate gradient (Sanh et al. 2020).

    Forward: ``(sigmoid(scores) > threshold)`` as 0/1 floats (exactly). Backward: the gradient
    of the surrogate ``sigmoid(scores)``, i.e. grad · σ(s)(1 - σ(s)).

    Args:
        scores: ``(*)`` floating-point scores.
        threshold: in [0, 1].

    Returns:
        ``(*)`` 0/1 mask in the dtype of ``scores``.

    Raises:
        ValueError: threshold outside [0, 1].
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold!r}")
    surrogate = torch.sigmoid(scores)
    hard = (surrogate > threshold).to(scores.dtype)
    # surrogate - surrogate.detach() is exactly 0 (sigmoid is finite), so the forward is `hard`.
    return hard + (surrogate - surrogate.detach())


# ----------------------------------------------------------------------------- Gumbel-sigmoid


def gumbel_sigmoid(
    logits: Tensor,
    *,
    temperature: float,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Binary-concrete (Gumbel-sigmoid) relaxation (Maddison et al. 2017; Jang et al. 2017).

    y = sigmoid((logits + log u - log(1-u)) / τ) with u ~ U(ε, 1-ε) (the difference of two
    Gumbel variables is logistic). With ``hard=True`` the forward is ``(y > 0.5)`` as 0/1 and
    the backward is the gradient of the soft ``y`` (straight-through). P(hard = 1) =
    sigmoid(logits), for any τ.

    Args:
        logits: ``(*)`` floating-point logits.
        temperature: τ > 0.
        hard: return a straight-through 0/1 sample instead of the soft one.
        generator: optional ``torch.Generator`` on the device of ``logits``.

    Returns:
        ``(*)`` soft values in (0, 1), or 0/1 values if ``hard``; dtype of ``logits``.

    Raises:
        ValueError: temperature <= 0.
    """
    tau = _check_temperature(temperature)
    u = _uniform_noise(logits, generator)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())
