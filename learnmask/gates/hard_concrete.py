"""Hard-concrete gate (Louizos, Welling & Kingma 2018), as used for structured pruning by CoFi
(Xia, Zhong & Chen 2022).

Shape legend: ``*shape`` is the gate's shape (any tuple of positive ints), N = prod(shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from learnmask.functional import (
    BETA,
    GAMMA,
    ZETA,
    _check_stretch,
    _check_temperature,
    deterministic_gate,
    expected_l0,
    hard_concrete_sample,
    prob_nonzero,
)
from learnmask.gates.base import Gate, _validate_keep_ratio, register_gate

__all__ = ["HardConcreteGate"]

#: Default log_alpha: the gate starts nearly open (P(z != 0) ≈ 0.99, deterministic gate = 1),
#: as in the CoFi and Louizos et al. reference implementations.
DEFAULT_INIT_LOG_ALPHA: float = 3.0

#: init_keep_ratio = 1 cannot be met with a finite log_alpha; ratios are clipped to this.
_MAX_KEEP_RATIO: float = 1.0 - 1e-6


@register_gate("hard_concrete")
class HardConcreteGate(Gate):
    """Stochastic hard-concrete gate with an L0 penalty (Louizos, Welling & Kingma 2018).

    Training: z = clamp(sigmoid((logit(u) + log_alpha)/β)(ζ-γ) + γ, 0, 1), u ~ U(0, 1),
    differentiable in ``log_alpha``. Eval (``eval_k`` None): the deterministic gate
    clamp(sigmoid(log_alpha)(ζ-γ) + γ, 0, 1) (Louizos et al. 2018, Eq. 13; CoFi 2022).
    ``expected_l0()`` = Σ P(z != 0), differentiable.

    Args:
        shape: tuple of positive ints, e.g. ``(n_layers, n_heads)``.
        temperature: β > 0 (default 2/3).
        stretch: (γ, ζ) with γ < 0 < 1 < ζ (default (-0.1, 1.1)).
        init_log_alpha: initial ``log_alpha`` (float or tensor broadcastable to ``shape``).
        init_keep_ratio: in (0, 1]: set ``log_alpha`` so that P(z != 0) = init_keep_ratio for
            every unit (1 is clipped to 1 - 1e-6, i.e. log_alpha ≈ 15.4).
            If neither is given, ``init_log_alpha = 3.0`` (nearly open).

    Raises:
        ValueError: bad shape, temperature, stretch or init_keep_ratio, or both init options.
    """

    def __init__(
        self,
        shape: Sequence[int] | int,
        *,
        temperature: float = BETA,
        stretch: tuple[float, float] = (GAMMA, ZETA),
        init_log_alpha: float | Tensor | None = None,
        init_keep_ratio: float | None = None,
    ) -> None:
        self._temperature = _check_temperature(temperature)
        self.stretch = _check_stretch(stretch)
        keep = _validate_keep_ratio(init_keep_ratio)
        if init_log_alpha is not None and keep is not None:
            raise ValueError(
                f"give init_log_alpha or init_keep_ratio, not both; got init_log_alpha="
                f"{init_log_alpha!r}, init_keep_ratio={init_keep_ratio!r}"
            )
        if keep is not None:
            init_log_alpha = self.log_alpha_for_keep_ratio(keep)
        elif init_log_alpha is None:
            init_log_alpha = DEFAULT_INIT_LOG_ALPHA
        super().__init__(shape, init_log_alpha=init_log_alpha)

    def log_alpha_for_keep_ratio(self, keep_ratio: float) -> float:
        """log_alpha with P(z != 0) = keep_ratio: logit(r) + β log(-γ/ζ) (inverse of Eq. 12).

        ``keep_ratio`` in (0, 1]; 1 is clipped to 1 - 1e-6.
        """
        r = min(float(keep_ratio), _MAX_KEEP_RATIO)
        gamma, zeta = self.stretch
        return math.log(r) - math.log1p(-r) + self.temperature * math.log(-gamma / zeta)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """``(*shape)`` hard-concrete sample in [0, 1], differentiable in ``log_alpha``."""
        return hard_concrete_sample(
            self.log_alpha, temperature=self.temperature, stretch=self.stretch, generator=generator
        )

    def _eval_mask(self) -> Tensor:
        return deterministic_gate(self.log_alpha, stretch=self.stretch)

    def expected_l0(self) -> Tensor:
        """``()`` Σ P(z != 0) in [0, N], differentiable in ``log_alpha``."""
        return expected_l0(self.log_alpha, temperature=self.temperature, stretch=self.stretch)

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` P(z != 0) per unit in [0, 1] (Louizos et al. 2018, Eq. 12), differentiable."""
        return prob_nonzero(self.log_alpha, temperature=self.temperature, stretch=self.stretch)

    @property
    def temperature(self) -> float:
        """β > 0; settable, so a schedule can anneal it (see :mod:`learnmask.gates.annealing`)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:.4g}, stretch={self.stretch}"
