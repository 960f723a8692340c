"""The gates of one classification run, as its :class:`MaskSpec` says: attaching them, the
controller and target schedule that drive them, fixing them after their learning phase, and
what they leave at evaluation.

Gate shapes (:mod:`learnmask.inject`): heads ``(L, H)``, ffn ``(L, I)``, hidden ``(d,)``,
attention_blocks and ffn_blocks ``(L,)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from learnmask import distributed
from learnmask.control import FixedPenalty, LagrangianController, PIController, control_metrics, make_schedule
from learnmask.gates import FixedGate
from learnmask.inject import MaskHandle, apply_masks
from learnmask.recipe.config import RunConfig
from learnmask.recipe.mask_spec import PENALTY_CONTROLLERS, MaskSpec
from learnmask.recipe.model import EncodedTexts, batches


def keep_count(total: int, sparsity: float) -> int:
    """Units kept when a fraction ``sparsity`` in [0, 1) of ``total`` is removed (rounded)."""
    return total - round(sparsity * total)


def make_controller(cfg: RunConfig, target, name: str | None = None):
    """The controller ``name`` (default: the run's ``controller``) driving a sparsity to ``target(step)``."""
    name = name or cfg.controller
    if name == "lagrangian":
        return LagrangianController(target, lr=cfg.controller_lr, damping=cfg.controller_damping)
    if name == "pi":
        return PIController(target, kp=cfg.controller_kp, ki=cfg.controller_ki, damping=cfg.controller_damping)
    return FixedPenalty(cfg.l0_weight)


def attach(cfg: RunConfig, model: nn.Module, spec: MaskSpec) -> MaskHandle:
    """Gates on ``model`` as ``spec`` says; ``random`` units are drawn from ``seed`` (exactly the
    target's share of each granularity), ``importance`` starts all open (see :func:`importance`)."""
    options = spec.apply_options(cfg.gate_init_log_alpha)
    if spec.learned:
        return apply_masks(model, **options)
    handle = apply_masks(model, **{**options, "gate": "fixed", "gate_options": {}})
    if spec.gate == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        for name, gate in list(handle.gates.items()):
            keep = keep_count(gate.numel, cfg.target_sparsity)
            random = FixedGate.random(tuple(gate.shape), keep=keep, generator=generator)
            distributed.broadcast_(random.log_alpha)  # rank 0's draw on every rank (DDP)
            handle.set_gate(name, random)
    return handle


def importance(
    model: nn.Module, handle: MaskHandle, data: EncodedTexts, pad_id: int, batch_size: int
) -> dict[str, Tensor]:
    """Unit importance of Michel, Levy & Neubig (2019) for every gated granularity.

    ``I_u = sum over batches of |∂L/∂z_u|`` at the open gate ``z = 1`` in eval mode (per-batch
    absolute values, as in the authors' code), then each layer's row divided by its L2 norm
    (a one-dimensional gate: the whole vector). Returns name -> scores of the gate's shape.
    """
    model.eval()
    handle.capture_grad = True
    scores = {name: torch.zeros_like(gate.log_alpha, dtype=torch.float32) for name, gate in handle.gates.items()}
    try:
        for batch in batches(data, list(range(len(data))), batch_size, pad_id):
            model(**batch).loss.backward()
            for name in scores:
                scores[name] += handle.z[name].grad.abs()
    finally:
        handle.capture_grad = False
        model.zero_grad(set_to_none=True)
    for score in scores.values():  # averaged over DDP ranks before any threshold (identity in one process)
        distributed.mean_(score)
    return {name: s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12) for name, s in scores.items()}


class Gating:
    """How the gates of a run train: target schedule, controller, learning phase, fixing.

    Args:
        cfg: the run config; ``spec``: its gates; ``handle``: the gates attached.
        total_steps: optimizer steps of the training phase (the target ramps over
            ``sparsity_warmup`` of them; learned gates are fixed after ``gate_phase``).
    """

    def __init__(self, cfg: RunConfig, spec: MaskSpec, handle: MaskHandle, total_steps: int):
        self.cfg, self.spec, self.handle = cfg, spec, handle
        self.fix_step = int(cfg.gate_phase * total_steps) if spec.learned else None
        self.target = make_schedule(cfg.sparsity_schedule, cfg.target_sparsity, int(cfg.sparsity_warmup * total_steps))
        penalized = spec.learned and spec.controller in PENALTY_CONTROLLERS
        self.controller = make_controller(cfg, self.target, spec.controller) if penalized else None
        self.sparsity_history: list[float] = []  # expected sparsity and target while gates learn
        self.target_history: list[float] = []

    def fixed(self, step: int) -> bool:
        """Whether the gates are past their learning phase at ``step`` (or were never learned)."""
        return self.fix_step is None or step >= self.fix_step

    def expected_sparsity(self) -> Tensor:
        """``()`` what the controller drives: mean expected fraction of units closed over the gated
        granularities, or the expected fraction of gated parameters removed."""
        if self.spec.sparsity == "parameters":
            return self.handle.expected_parameter_sparsity()
        values = [self.handle.expected_unit_sparsity(name) for name in self.handle.gates]
        return values[0] if len(values) == 1 else torch.stack(values).mean()

    def keep_counts(self) -> dict[str, int]:
        """Units each granularity keeps once fixed: the target's share (``units``), or the gate's
        rounded expected count (``parameters``)."""
        counts = {}
        for name, gate in self.handle.gates.items():
            if self.spec.sparsity == "units":
                counts[name] = keep_count(gate.numel, self.cfg.target_sparsity)
            else:
                counts[name] = min(gate.numel, max(0, round(gate.expected_l0().item())))
        return counts

    def fix(self) -> None:
        """Replace each learned gate by a :class:`FixedGate` of its top units (no-op once fixed)."""
        keep = None
        for name, gate in list(self.handle.gates.items()):
            if not isinstance(gate, FixedGate):
                keep = keep or self.keep_counts()
                self.handle.set_gate(name, FixedGate(gate.deterministic_mask(keep[name]).detach()))

    def before_step(self, step: int) -> None:
        """Fix the gates once their phase is over; move ``k`` of top-k gates to the target."""
        if self.fixed(step):
            if self.fix_step is not None:
                self.fix()
        elif self.spec.controller == "schedule":
            for gate in self.handle.gates.values():
                gate.k = keep_count(gate.numel, self.target(step))

    def penalty(self, step: int) -> Tensor | None:
        """The controller's penalty on the expected sparsity at ``step`` (None when there is none)."""
        if self.controller is None or self.fixed(step):
            return None
        sparsity = self.expected_sparsity()
        self.sparsity_history.append(sparsity.item())
        self.target_history.append(self.target(step))
        return self.controller.penalty(sparsity)

    def after_step(self, step: int, skipped: bool) -> None:
        """Dual ascent / PI update after a step that was taken."""
        if self.controller is not None and not self.fixed(step) and not skipped:
            self.controller.step()

    def state_dict(self) -> dict:
        fixed = {name: gate.deterministic_mask().detach() for name, gate in self.handle.gates.items()
                 if isinstance(gate, FixedGate)}
        return {"controller": self.controller.state_dict() if self.controller else None, "fixed_masks": fixed,
                "history": [list(self.sparsity_history), list(self.target_history)]}

    def load_state_dict(self, state: dict) -> None:
        for name, mask in state["fixed_masks"].items():
            self.handle.set_gate(name, FixedGate(mask))
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.sparsity_history, self.target_history = (list(h) for h in state["history"])

    def log(self, writer, step: int) -> None:
        """Expected sparsity, target, controller numbers and per-layer keep ratios."""
        writer.add_scalar("sparsity/expected", self.expected_sparsity().item(), step)
        writer.add_scalar("sparsity/target", self.target(step), step)
        if self.controller is not None and not self.fixed(step):  # multipliers, penalty, P/I terms
            for name, value in self.controller.last_metrics().items():
                if isinstance(value, (int, float)) and name not in ("target", "sparsity"):
                    writer.add_scalar(f"controller/{name}", value, step)
        for name, gate in self.handle.gates.items():
            if gate.log_alpha.dim() == 2:
                for layer, keep in enumerate(self.handle.keep_per_layer(name)):
                    tag = f"keep_ratio/{name}/layer_{layer}" if name != "heads" else f"keep_ratio/layer_{layer}"
                    writer.add_scalar(tag, keep, step)

    def control_metrics(self) -> dict:
        """The controller's last numbers (``controller_*``), how well it tracked the target
        (``control_*``) and about 100 points of the trajectory for figures."""
        if self.controller is None:
            return {}
        metrics = {f"controller_{k}": v for k, v in self.controller.last_metrics().items()}
        if self.sparsity_history:
            control = control_metrics(self.sparsity_history, self.target_history)
            metrics.update({f"control_{k}": v for k, v in control.items()})
            every = max(1, len(self.sparsity_history) // 100)
            metrics["trajectory"] = {"every": every, "sparsity": [round(x, 5) for x in self.sparsity_history[::every]],
                                     "target": [round(x, 5) for x in self.target_history[::every]]}
        return metrics


def gate_metrics(handle: MaskHandle, spec: MaskSpec) -> dict:
    """What the fixed gates keep: units per granularity, head mask, parameters by formula, and
    the realized sparsity in the spec's measure (units: mean fraction closed)."""
    masks = handle.eval_masks()
    units = {name: [int((mask > 0).sum()), mask.numel()] for name, mask in masks.items()}
    parameters, dense = handle.remaining_parameters(), handle.dense_parameters()
    unit_sparsity = sum(1 - kept / total for kept, total in units.values()) / len(units)
    parameter_sparsity = (dense - parameters) / handle.prunable_parameters()
    metrics = {"realized_sparsity": unit_sparsity if spec.sparsity == "units" else parameter_sparsity,
               "realized_parameter_sparsity": parameter_sparsity, "units_kept": units,
               "parameters": parameters, "parameters_dense": dense, "heads_kept": None, "heads_total": None}
    if "heads" in masks:
        metrics.update(heads_kept=units["heads"][0], heads_total=units["heads"][1],
                       head_mask=(masks["heads"] > 0).int().tolist())
    return metrics
