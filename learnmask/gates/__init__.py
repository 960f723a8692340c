"""Learnable gates over units (heads, neurons, layers): the :class:`Gate` base, its registry,
and the registered kinds "hard_concrete", "topk", "threshold", "gumbel_sigmoid" and "fixed".

Importing this package registers all built-in kinds.
"""

from learnmask.gates.annealing import TemperatureAnnealer, temperature_at
from learnmask.gates.base import Gate, available_gates, make_gate, param_groups, register_gate
from learnmask.gates.fixed import FixedGate
from learnmask.gates.hard_concrete import HardConcreteGate
from learnmask.gates.straight_through import GumbelSigmoidGate, ThresholdGate, TopKGate

__all__ = [
    "Gate",
    "register_gate",
    "make_gate",
    "available_gates",
    "param_groups",
    "HardConcreteGate",
    "TopKGate",
    "ThresholdGate",
    "GumbelSigmoidGate",
    "FixedGate",
    "TemperatureAnnealer",
    "temperature_at",
]
