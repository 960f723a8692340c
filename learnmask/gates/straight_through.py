"""Straight-through gates: top-k and threshold (movement pruning, Sanh, Wolf & Rush 2020) and
the Gumbel-sigmoid gate (Maddison et al. 2017; Jang et al. 2017).

Shape legend: ``*shape`` is the gate's shape (any tuple of positive ints), N = prod(shape).
Here ``log_alpha`` holds the scores (movement-pruning ``S``) or logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from learnmask.functional import (
    _check_temperature,
    gumbel_sigmoid,
    straight_through_threshold,
    straight_through_topk,
    topk_mask,
)
from learnmask.gates.base import Gate, _validate_keep_ratio, _validate_shape, register_gate

__all__ = ["TopKGate", "ThresholdGate", "GumbelSigmoidGate"]

#: Standard deviation of the noise added to initial scores so that ties are broken at random.
DEFAULT_INIT_NOISE_STD: float = 1e-3
#: ThresholdGate: initial distance of scores from logit(threshold) (kept: +, removed: -).
_THRESHOLD_MARGIN: float = 1.0
#: Keep ratios of 1 are clipped to this where a finite logit is needed.
_MAX_KEEP_RATIO: float = 1.0 - 1e-6


def _check_both(init_log_alpha: object, other_name: str, other: object) -> None:
    if init_log_alpha is not None and other is not None:
        raise ValueError(
            f"give init_log_alpha or {other_name}, not both; got init_log_alpha="
            f"{init_log_alpha!r}, {other_name}={other!r}"
        )


def _noise(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """``(*shape)`` N(0, std²) noise from ``generator`` (None: torch's global RNG)."""
    if not float(std) >= 0.0:
        raise ValueError(f"init_noise_std must be >= 0; got {std!r}")
    return torch.randn(shape, generator=generator) * std


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@register_gate("topk")
class TopKGate(Gate):
    """Straight-through top-k gate (movement pruning, Sanh, Wolf & Rush 2020).

    Forward (train and eval with ``eval_k`` None): a hard 0/1 mask with exactly ``self.k`` ones
    at the largest ``log_alpha`` over ALL elements (ties: lower flat index); ``k`` None keeps all.
    Backward: identity (straight-through) gradient to ``log_alpha``. ``k`` is a settable
    attribute so a schedule can move it during training. ``expected_l0()`` is ``k`` as a float
    tensor without gradient.

    Initial scores are ``init_log_alpha + init_noise_std * ε``, ε ~ N(0, 1) drawn from
    ``generator`` (None: torch's global RNG, so ``torch.manual_seed`` makes it reproducible).
    The noise breaks ties at random; with equal scores the lowest indices would always win.

    Args:
        shape: tuple of positive ints.
        k: units kept, int in [0, N], or None (all kept).
        init_keep_ratio: in (0, 1]; sets ``k = max(1, round(init_keep_ratio * N))`` when ``k``
            is None.
        init_log_alpha: constant (or tensor broadcastable to ``shape``) around which scores
            start; default 0.0.
        init_noise_std: standard deviation of the tie-breaking noise, >= 0 (default 1e-3).
        generator: optional CPU ``torch.Generator`` for the noise.

    Raises:
        ValueError: bad shape, k outside [0, N], bad init_keep_ratio, both k and
            init_keep_ratio, negative init_noise_std.
    """

    def __init__(
        self,
        shape: Sequence[int] | int,
        *,
        k: int | None = None,
        init_keep_ratio: float | None = None,
        init_log_alpha: float | Tensor = 0.0,
        init_noise_std: float = DEFAULT_INIT_NOISE_STD,
        generator: torch.Generator | None = None,
    ) -> None:
        shape = _validate_shape(shape)
        keep = _validate_keep_ratio(init_keep_ratio)
        if k is not None and keep is not None:
            raise ValueError(f"give k or init_keep_ratio, not both; got k={k!r}, "
                             f"init_keep_ratio={init_keep_ratio!r}")
        noise = _noise(shape, init_noise_std, generator)
        super().__init__(shape, init_log_alpha=init_log_alpha)
        with torch.no_grad():
            self.log_alpha.add_(noise)
        if keep is not None:
            k = max(1, round(keep * self.numel))
        self.k = k

    @property
    def k(self) -> int | None:
        """Units kept by the forward: None (all) or an int in [0, N]."""
        return self._k

    @k.setter
    def k(self, value: int | None) -> None:
        self._k = self._check_count("k", value)

    def _kept(self) -> int:
        return self.numel if self._k is None else self._k

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """``(*shape)`` 0/1 top-k mask, identity gradient to ``log_alpha`` (no randomness)."""
        return straight_through_topk(self.log_alpha, self._kept())

    def _eval_mask(self) -> Tensor:
        return topk_mask(self.log_alpha.detach(), self._kept()).to(self.log_alpha.dtype)

    def expected_l0(self) -> Tensor:
        """``()`` float tensor ``k`` (N if k is None); no gradient."""
        return torch.tensor(float(self._kept()), dtype=self.log_alpha.dtype,
                            device=self.log_alpha.device)

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` the current 0/1 top-k mask (no gradient, like ``expected_l0``)."""
        return topk_mask(self.log_alpha.detach(), self._kept()).to(self.log_alpha.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


@register_gate("threshold")
class ThresholdGate(Gate):
    """Straight-through threshold gate (soft movement pruning, Sanh, Wolf & Rush 2020).

    Forward (train, and eval with ``eval_k`` None): ``(sigmoid(log_alpha) > threshold)`` as
    0/1. Backward: gradient of the surrogate ``sigmoid(log_alpha)``. ``expected_l0()`` has
    the value of the number of units kept and the gradient of Σ sigmoid(log_alpha) (the
    regulariser of soft movement pruning).

    Initialisation: ``init_log_alpha`` (a constant or tensor) if given; otherwise, with
    r = ``init_keep_ratio`` (default 1.0), a random set of round(r·N) units (at least 1; drawn
    from ``generator`` or torch's global RNG) starts at logit(threshold) + 1 and the others at
    logit(threshold) - 1, plus N(0, 1e-3²) noise, so exactly that many start above threshold.

    Args:
        shape: tuple of positive ints.
        threshold: in (0, 1), default 0.5.
        init_log_alpha: float or tensor broadcastable to ``shape``.
        init_keep_ratio: in (0, 1].
        generator: optional CPU ``torch.Generator`` for the initial noise.

    Raises:
        ValueError: bad shape, threshold outside (0, 1), bad init_keep_ratio, both init options.
    """

    def __init__(
        self,
        shape: Sequence[int] | int,
        *,
        threshold: float = 0.5,
        init_log_alpha: float | Tensor | None = None,
        init_keep_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        shape = _validate_shape(shape)
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {threshold!r}")
        keep = _validate_keep_ratio(init_keep_ratio)
        _check_both(init_log_alpha, "init_keep_ratio", init_keep_ratio)
        if init_log_alpha is None:
            noise = _noise(shape, DEFAULT_INIT_NOISE_STD, generator)
            n_keep = max(1, round((1.0 if keep is None else keep) * math.prod(shape)))
            kept = topk_mask(torch.randn(shape, generator=generator), n_keep)
            sign = torch.where(kept, 1.0, -1.0)
            init_log_alpha = (
                _logit(float(threshold)) + _THRESHOLD_MARGIN * sign + noise.clamp(-0.5, 0.5)
            )
        super().__init__(shape, init_log_alpha=init_log_alpha)
        self.threshold = float(threshold)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """``(*shape)`` 0/1 mask; sigmoid-surrogate gradient (no randomness)."""
        return straight_through_threshold(self.log_alpha, self.threshold)

    def _eval_mask(self) -> Tensor:
        return (torch.sigmoid(self.log_alpha.detach()) > self.threshold).to(self.log_alpha.dtype)

    def expected_l0(self) -> Tensor:
        """``()`` number of units kept (value), gradient of Σ sigmoid(log_alpha)."""
        return straight_through_threshold(self.log_alpha, self.threshold).sum()

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` 0/1 kept mask (value) with the gradient of sigmoid(log_alpha)."""
        return straight_through_threshold(self.log_alpha, self.threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


@register_gate("gumbel_sigmoid")
class GumbelSigmoidGate(Gate):
    """Gumbel-sigmoid (binary concrete) gate (Maddison et al. 2017; Jang et al. 2017).

    Training: z = sigmoid((log_alpha + logit(u)) / τ), u ~ U(0, 1); with ``hard=True`` the
    straight-through 0/1 version (forward z > 0.5, backward of the soft z). Eval (``eval_k``
    None): ``(log_alpha > 0)`` as 0/1, the most likely hard value. ``expected_l0()`` =
    Σ sigmoid(log_alpha) = E[number of hard ones], differentiable.

    Args:
        shape: tuple of positive ints.
        temperature: τ > 0 (default 0.5).
        hard: straight-through 0/1 samples in training (default False).
        init_log_alpha: float or tensor broadcastable to ``shape``; default 3.0 (nearly open).
        init_keep_ratio: in (0, 1]: log_alpha = logit(r) so that P(hard z = 1) = r (1 is
            clipped to 1 - 1e-6).

    Raises:
        ValueError: bad shape, temperature <= 0, bad init_keep_ratio, both init options.
    """

    def __init__(
        self,
        shape: Sequence[int] | int,
        *,
        temperature: float = 0.5,
        hard: bool = False,
        init_log_alpha: float | Tensor | None = None,
        init_keep_ratio: float | None = None,
    ) -> None:
        self._temperature = _check_temperature(temperature)
        keep = _validate_keep_ratio(init_keep_ratio)
        _check_both(init_log_alpha, "init_keep_ratio", init_keep_ratio)
        if keep is not None:
            init_log_alpha = _logit(min(keep, _MAX_KEEP_RATIO))
        elif init_log_alpha is None:
            init_log_alpha = 3.0
        super().__init__(shape, init_log_alpha=init_log_alpha)
        self.hard = bool(hard)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """``(*shape)`` soft sample in (0, 1), or 0/1 if ``hard``; differentiable."""
        return gumbel_sigmoid(
            self.log_alpha, temperature=self.temperature, hard=self.hard, generator=generator
        )

    def _eval_mask(self) -> Tensor:
        return (self.log_alpha.detach() > 0).to(self.log_alpha.dtype)

    def expected_l0(self) -> Tensor:
        """``()`` Σ sigmoid(log_alpha) in [0, N], differentiable."""
        return torch.sigmoid(self.log_alpha).sum()

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` P(hard z = 1) = sigmoid(log_alpha) per unit, differentiable."""
        return torch.sigmoid(self.log_alpha)

    @property
    def temperature(self) -> float:
        """τ > 0; settable, so a schedule can anneal it (see :mod:`learnmask.gates.annealing`)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:.4g}, hard={self.hard}"
