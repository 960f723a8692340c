"""The two controller interfaces every mask ratio uses (heads, FFN, tokens, parameters, MLM rate).

* :class:`PenaltyController` — reads a measured sparsity ``s`` (0-dim tensor in [0, 1] with
  gradient to the gates) and returns a penalty term for the loss; steps once per optimizer
  step. :class:`~learnmask.control.LagrangianController`,
  :class:`~learnmask.control.PIDController` / :class:`~learnmask.control.PIController`,
  :class:`~learnmask.control.FixedPenalty`.
* :class:`RatioController` — reads the training loss and returns a new ratio in [0, 1]
  (a masking rate or a keep ratio). :class:`~learnmask.control.LossAdaptiveController`.

Both are plain objects (no ``nn.Module``), with ``state_dict()`` / ``load_state_dict()`` of
plain Python numbers, so that checkpoints restore them exactly and every DDP rank that feeds
them the same numbers holds the same state.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class PenaltyController(Protocol):
    """Turns a measured sparsity into a loss penalty; one ``step()`` per optimizer step."""

    def penalty(self, s: Tensor | float) -> Tensor:
        """Penalty for sparsity ``s`` (differentiable in ``s``); records ``s`` for ``step()``."""

    def step(self) -> None:
        """Update the controller's state from the recorded ``s`` (skipped if it was not finite)."""

    def last_metrics(self) -> dict[str, Any]:
        """Numbers for logging (target, sparsity, multipliers, penalty)."""

    def state_dict(self) -> dict[str, Any]:
        """The whole mutable state, as plain Python numbers."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly; missing or unknown keys are errors."""


@runtime_checkable
class RatioController(Protocol):
    """Turns the training loss into a new ratio in [0, 1]; one ``update()`` per optimizer step."""

    @property
    def ratio(self) -> float:
        """The current ratio, in [0, 1]."""

    def update(self, loss: float) -> float:
        """Move the ratio from ``loss`` (a non-finite loss leaves it unchanged); return it."""

    def last_metrics(self) -> dict[str, Any]:
        """Numbers for logging."""

    def state_dict(self) -> dict[str, Any]:
        """The whole mutable state, as plain Python numbers."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly; missing or unknown keys are errors."""
