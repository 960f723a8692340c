"""Sparsity control: target schedules and penalty controllers.

* :mod:`~learnmask.control.schedules` -- ``schedule(step) -> target sparsity``.
* :mod:`~learnmask.control.rate_schedules` -- ``schedule(step) -> mlm_probability`` (constant,
  linear or cosine decay; Ankner et al., 2023).
* :mod:`~learnmask.control.lagrangian` -- :class:`LagrangianController` (dual ascent on
  the CoFi penalty) and the :class:`FixedPenalty` L0 baseline.
"""

from .base import PenaltyController, RatioController
from .fixed_penalty import FixedPenalty
from .lagrangian import LagrangianController, lagrangian_penalty
from .loss_adaptive import LossAdaptiveController
from .metrics import control_metrics
from .pid import PIController, PIDController
from .rate_schedules import RATE_SCHEDULE_KINDS, ConstantRate, CosineDecay, LinearDecay, make_rate_schedule
from .schedules import (
    SCHEDULE_KINDS,
    ConstantTarget,
    CubicWarmup,
    LinearWarmup,
    Schedule,
    check_target_sparsity,
    make_schedule,
)

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
    "RATE_SCHEDULE_KINDS",
    "ConstantRate",
    "CosineDecay",
    "LinearDecay",
    "make_rate_schedule",
    "control_metrics",
    "PIController",
    "PIDController",
]
