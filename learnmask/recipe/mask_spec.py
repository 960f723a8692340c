"""What a classification run gates, as a table: which units, which gate kind, which controller.

A grid row writes it as ``masks = { units = ["heads", "ffn"], gate = "hard_concrete",
controller = "lagrangian", sparsity = "parameters" }`` with ``method = "gates"``; the older
``method`` names are presets of the same table (:func:`preset`). A new study adds grid rows,
not a new training loop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from learnmask.inject.config import ATTENTION_MODES, GRANULARITIES
from learnmask.recipe.validated import check_finite

#: Controllers that add a penalty on the expected sparsity (see ``RunConfig.controller``).
PENALTY_CONTROLLERS = ("lagrangian", "pi", "fixed")
#: ``schedule``: a top-k gate keeps ``k`` units, ``k`` following the target schedule; ``none``:
#: no controller (fixed gates, or learned gates trained by the task loss alone).
CONTROLLERS = (*PENALTY_CONTROLLERS, "schedule", "none")
#: Fixed baselines chosen before fine-tuning: seeded random units, or the least important
#: units by |∂L/∂z| after dense fine-tuning (Michel, Levy & Neubig, 2019).
FIXED_GATES = ("random", "importance")
#: What the controller drives to ``target_sparsity`` and evaluation realizes: the fraction of
#: gated units closed (mean over the gated granularities), or of gated parameters removed.
SPARSITY_MEASURES = ("units", "parameters")


def _learnable_gates() -> list[str]:
    from learnmask.gates import available_gates

    return [name for name in available_gates() if name != "fixed"]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The gates of one classification run.

    Attributes:
        units: granularities gated (``learnmask.inject.GRANULARITIES``: heads, ffn, hidden,
            attention_blocks, ffn_blocks), at least one.
        gate: a registered learnable gate kind (``hard_concrete``, ``topk``, ``threshold``,
            ``gumbel_sigmoid``, or one of your own), learned with the model for ``gate_phase``
            of the steps and then fixed; or a fixed baseline ``random`` / ``importance``.
        gate_options: keyword options of that gate kind (numbers finite). Hard-concrete gates
            start at the run's ``gate_init_log_alpha`` unless this sets ``init_log_alpha``
            or ``init_keep_ratio``.
        controller: ``lagrangian``, ``pi`` or ``fixed`` (a penalty on the expected sparsity,
            settings from the run's ``controller_*`` and ``l0_weight`` fields), ``schedule``
            (top-k gates only: ``k`` follows the target schedule) or ``none``. Default: ``none``
            for fixed gates, ``schedule`` for ``topk``, ``lagrangian`` otherwise.
        sparsity: ``units`` (fraction of units closed; evaluation keeps exactly
            ``round((1 - target) * N)`` units of each granularity) or ``parameters`` (expected
            fraction of gated parameters removed, CoFi-style; evaluation keeps each gate's
            rounded expected number of units).
        attention, backend: as :class:`learnmask.MaskConfig`.

    Raises:
        ValueError: an unknown unit, gate kind, controller or measure; a controller that
            cannot drive that gate; a non-finite option.
    """

    units: tuple[str, ...] = ("heads",)
    gate: str = "hard_concrete"
    gate_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    controller: str | None = None
    sparsity: str = "units"
    attention: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        units = self.units
        if isinstance(units, str) or not isinstance(units, (list, tuple)) or not units:
            raise ValueError(f"masks.units must be a non-empty list of {list(GRANULARITIES)}; got {units!r}")
        bad = [u for u in units if u not in GRANULARITIES]
        if bad or len(set(units)) != len(units):
            raise ValueError(f"masks.units must name each of {list(GRANULARITIES)} at most once; got {list(units)}")
        object.__setattr__(self, "units", tuple(u for u in GRANULARITIES if u in units))
        kinds = [*_learnable_gates(), *FIXED_GATES]
        if self.gate not in kinds:
            raise ValueError(f"masks.gate must be one of {kinds}; got {self.gate!r}")
        if not isinstance(self.gate_options, Mapping):
            raise ValueError(f"masks.gate_options must be a table; got {self.gate_options!r}")
        for name, value in self.gate_options.items():
            check_finite(f"masks.gate_options.{name}", value)
        if self.gate in FIXED_GATES and self.gate_options:
            raise ValueError(f"masks.gate {self.gate!r} takes no gate_options; got {dict(self.gate_options)}")
        object.__setattr__(self, "gate_options", dict(self.gate_options))
        default = "none" if self.gate in FIXED_GATES else "schedule" if self.gate == "topk" else "lagrangian"
        object.__setattr__(self, "controller", self.controller or default)
        self._check_controller()
        if self.attention not in ATTENTION_MODES or not isinstance(self.backend, str):
            raise ValueError(f"masks.attention must be one of {list(ATTENTION_MODES)} and masks.backend "
                             f"a backend name; got {self.attention!r}, {self.backend!r}")

    def _check_controller(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ValueError(f"masks.controller must be one of {list(CONTROLLERS)}; got {self.controller!r}")
        if self.sparsity not in SPARSITY_MEASURES:
            raise ValueError(f"masks.sparsity must be one of {list(SPARSITY_MEASURES)}; got {self.sparsity!r}")
        if self.gate in FIXED_GATES and (self.controller != "none" or self.sparsity != "units"):
            raise ValueError(f"masks.gate {self.gate!r} is fixed before fine-tuning: it needs controller 'none' and "
                             f"sparsity 'units'; got {self.controller!r}, {self.sparsity!r}")
        if self.controller == "schedule" and (self.gate != "topk" or self.sparsity != "units"):
            raise ValueError(f"masks.controller 'schedule' moves the k of top-k gates (gate 'topk', sparsity 'units'); "
                             f"got gate {self.gate!r}, sparsity {self.sparsity!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MaskSpec:
        """Build from a TOML table; an unknown key is an error naming the known ones."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in masks; known keys: {known}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The table with every key filled in (what a run config stores and hashes)."""
        return {**dataclasses.asdict(self), "units": list(self.units)}

    @property
    def learned(self) -> bool:
        """Whether the gates learn with the model (else they are fixed before fine-tuning)."""
        return self.gate not in FIXED_GATES

    def apply_options(self, gate_init_log_alpha: float) -> dict[str, Any]:
        """Keyword arguments of :func:`learnmask.apply_masks` for a learned gate kind."""
        options = dict(self.gate_options)
        if self.gate == "hard_concrete" and not {"init_log_alpha", "init_keep_ratio"} & set(options):
            options["init_log_alpha"] = gate_init_log_alpha
        return {**{unit: unit in self.units for unit in GRANULARITIES}, "gate": self.gate, "gate_options": options,
                "attention": self.attention, "backend": self.backend}


def preset(method: str, *, controller: str, gate_init_log_alpha: float) -> MaskSpec | None:
    """The mask table that an older ``method`` name stands for (None for ``dense``).

    ``hard_concrete``: hard-concrete head gates driven by ``controller``; ``topk``: top-k head
    scores with ``k`` following the target; ``random``, ``importance``: fixed head baselines.
    """
    if method == "dense":
        return None
    if method == "hard_concrete":
        return MaskSpec(gate="hard_concrete", gate_options={"init_log_alpha": gate_init_log_alpha},
                        controller=controller)
    return MaskSpec(gate=method)
