"""Fixed (non-trainable) gate for ablation baselines: random removal or removal by importance
scores (e.g. Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?").

Shape legend: ``*shape`` is the gate's shape (any tuple of positive ints), N = prod(shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from learnmask.functional import topk_mask
from learnmask.gates.base import Gate, _validate_shape, register_gate

__all__ = ["FixedGate"]

#: log_alpha of kept (+) and removed (-) units; large enough that any gate rule agrees.
FIXED_LOG_ALPHA: float = 10.0


@register_gate("fixed")
class FixedGate(Gate):
    """A fixed 0/1 mask with no trainable parameters.

    ``log_alpha`` is a buffer derived from the mask: +10 where kept, -10 where removed, so
    ``deterministic_mask(k)`` with k = number kept returns the mask itself. ``forward()``
    returns the mask in training and in eval (unless ``eval_k`` is set). ``expected_l0()`` is
    the number of ones (no gradient).

    Args:
        mask: ``(*shape)`` bool tensor, or numeric tensor with values in {0, 1}; at least 1-D.

    Raises:
        ValueError: mask values outside {0, 1}, or an empty / 0-d mask.
    """

    def __init__(self, mask: Tensor) -> None:
        mask = torch.as_tensor(mask).detach()
        if mask.dim() == 0 or mask.numel() == 0:
            raise ValueError(f"mask must be a non-empty tensor of at least 1 dim; got shape "
                             f"{tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask values must be 0/1 or bool; got values "
                                 f"{torch.unique(mask)[:8].tolist()}")
            mask = mask == 1
        log_alpha = torch.where(mask.cpu(), FIXED_LOG_ALPHA, -FIXED_LOG_ALPHA)
        super().__init__(tuple(mask.shape), init_log_alpha=log_alpha, trainable=False)

    @classmethod
    def random(
        cls, shape: Sequence[int] | int, *, keep: int, generator: torch.Generator | None = None
    ) -> FixedGate:
        """A gate keeping exactly ``keep`` units chosen uniformly at random.

        Args:
            shape: tuple of positive ints.
            keep: int in [0, N].
            generator: optional CPU ``torch.Generator`` (None: torch's global RNG).

        Raises:
            ValueError: bad shape, or keep outside [0, N].
        """
        shape = _validate_shape(shape)
        scores = torch.rand(shape, generator=generator)
        return cls(topk_mask(scores, keep))

    @classmethod
    def from_scores(cls, scores: Tensor, *, keep: int) -> FixedGate:
        """A gate keeping the ``keep`` units with the highest ``scores`` (ties: lower index).

        Args:
            scores: ``(*shape)`` importance scores, e.g. head importance.
            keep: int in [0, N].

        Raises:
            ValueError: keep outside [0, N], NaN scores.
        """
        return cls(topk_mask(torch.as_tensor(scores), keep))

    @classmethod
    def from_shape(
        cls,
        shape: Sequence[int] | int,
        *,
        mask: Tensor | None = None,
        scores: Tensor | None = None,
        keep: int | None = None,
        generator: torch.Generator | None = None,
    ) -> FixedGate:
        """Build for :func:`make_gate`: from ``mask``; top-``keep`` of ``scores``; ``keep``
        random units; or, with no options, all units kept.

        Raises:
            ValueError: options that disagree with ``shape`` or with each other.
        """
        shape = _validate_shape(shape)
        if mask is not None or scores is not None:
            given = mask if mask is not None else scores
            if tuple(torch.as_tensor(given).shape) != shape:
                raise ValueError(f"mask/scores have shape {tuple(torch.as_tensor(given).shape)}; "
                                 f"expected {shape}")
        if mask is not None:
            if scores is not None or keep is not None:
                raise ValueError("give mask alone, or scores/keep; got mask together with them")
            return cls(mask)
        if scores is not None:
            n_keep = torch.as_tensor(scores).numel() if keep is None else keep
            return cls.from_scores(scores, keep=n_keep)
        if keep is not None:
            return cls.random(shape, keep=keep, generator=generator)
        return cls(torch.ones(shape, dtype=torch.bool))

    @property
    def mask(self) -> Tensor:
        """``(*shape)`` the fixed 0/1 mask in the dtype of ``log_alpha``."""
        return (self.log_alpha > 0).to(self.log_alpha.dtype)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """``(*shape)`` the fixed mask (no randomness)."""
        return self.mask

    def _eval_mask(self) -> Tensor:
        return self.mask

    def expected_l0(self) -> Tensor:
        """``()`` number of kept units (float, no gradient)."""
        return self.mask.sum()

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` the fixed 0/1 mask."""
        return self.mask

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={int(self.mask.sum())}"
