"""Sparsity control: target schedules and penalty controllers.

* :mod:`~learnmask.control.schedules` -- ``schedule(step) -> target sparsity``.
* :mod:`~learnmask.control.lagrangian` -- :class:`LagrangianController` (dual ascent on
  the CoFi penalty) and the :class:`FixedPenalty` L0 baseline.
"""

from .base import PenaltyController, RatioController
from .fixed_penalty import FixedPenalty
from .lagrangian import LagrangianController, lagrangian_penalty
from .schedules import (
    SCHEDULE_KINDS,
    ConstantTarget,
    CubicWarmup,
    LinearWarmup,
    Schedule,
    check_target_sparsity,
    make_schedule,
)
from .loss_adaptive import LossAdaptiveController
from .metrics import control_metrics
from .pid import PIController, PIDController

__all__ = [
    "PenaltyController",
    "RatioController",
    "FixedPenalty",
    "LagrangianController",
    "lagrangian_penalty",
    "SCHEDULE_KINDS",
    "ConstantTarget",
    "CubicWarmup",
    "LinearWarmup",
    "Schedule",
    "check_target_sparsity",
    "make_schedule",
    "LossAdaptiveController",
    "control_metrics",
    "PIController",
    "PIDController",
]
