"""learnmask: learnable and dynamic masks for fine-tuning.

The front door, ``import learnmask as lm`` (names load on first use, so the import itself is
cheap and pulls in no torch)::

    handle = lm.apply_masks(model, heads=True, ffn=True)      # one handle, any granularity
    # or parameters: lm.apply_masks(model, freeze={"layers": [0, 1]}, diff_masks={"pattern": "*.weight"})
    controller = lm.LagrangianController(lm.LinearWarmup(0.5, warmup_steps=200))
    loss = task_loss + controller.penalty(handle.expected_unit_sparsity("heads"))
    small = handle.finalize()                                # closed units physically removed
    out = lm.masked_attention(q, k, v, mask=lm.causal() & lm.padding(attention_mask))

Groups of names (each also in its subpackage):

- gating a model: ``apply_masks``, ``apply_head_gates``, ``MaskConfig``, ``MaskHandle``,
  ``finalize``, ``save_pruned``, ``load_pruned`` (:mod:`learnmask.inject`,
  :mod:`learnmask.export`);
- gate kinds: ``Gate``, ``HardConcreteGate``, ``TopKGate``, ``ThresholdGate``,
  ``GumbelSigmoidGate``, ``FixedGate``, ``make_gate``, ``register_gate``, ``available_gates``,
  ``param_groups`` (:mod:`learnmask.gates`);
- controllers and schedules: ``LagrangianController``, ``PIController``, ``PIDController``,
  ``FixedPenalty``, ``LossAdaptiveController``, ``ConstantTarget``, ``LinearWarmup``,
  ``CubicWarmup``, ``make_schedule``, ``ConstantRate``, ``LinearDecay``, ``CosineDecay``
  (:mod:`learnmask.control`);
- parameter masks (what fine-tuning may change): ``freeze``, ``select_parameters``,
  ``ParameterMasks``, ``FrozenParameters``, ``apply_weight_masks``, ``apply_diff_masks``,
  ``export_weights`` (:mod:`learnmask.params`), also through ``apply_masks(model, freeze={...},
  weight_masks={...}, diff_masks={...})`` and the handle's ``mask_updates``;
- masked attention: ``masked_attention``, ``backend_reasons``, ``choose_backend``
  (:mod:`learnmask.ops`) and the attention masks ``AttentionMask``, ``full``, ``causal``,
  ``sliding_window``, ``chunked``, ``padding``, ``from_key_padding_mask``, ``prefix_lm``,
  ``document``, ``from_mod`` (:mod:`learnmask.masks.attention`);
- input masking: ``MLMCollator``, ``mask_tokens`` (:mod:`learnmask.masks`);
- a Hugging Face ``Trainer``: ``GateCallback`` (:mod:`learnmask.trainer_callback`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "learnmask.inject": ("apply_masks", "apply_head_gates", "MaskConfig", "MaskHandle"),
    "learnmask.export": ("finalize", "save_pruned", "load_pruned"),
    "learnmask.gates": ("Gate", "HardConcreteGate", "TopKGate", "ThresholdGate", "GumbelSigmoidGate", "FixedGate",
                        "make_gate", "register_gate", "available_gates", "param_groups"),
    "learnmask.control": ("LagrangianController", "PIController", "PIDController", "FixedPenalty",
                          "LossAdaptiveController", "ConstantTarget", "LinearWarmup", "CubicWarmup", "make_schedule",
                          "ConstantRate", "LinearDecay", "CosineDecay"),
    "learnmask.params": ("freeze", "select_parameters", "ParameterMasks", "FrozenParameters", "apply_weight_masks",
                         "apply_diff_masks", "export_weights"),
    "learnmask.ops": ("masked_attention", "backend_reasons", "choose_backend"),
    "learnmask.masks.attention": ("AttentionMask", "full", "causal", "sliding_window", "chunked", "padding",
                                  "from_key_padding_mask", "prefix_lm", "document", "from_mod"),
    "learnmask.masks": ("MLMCollator", "mask_tokens"),
    "learnmask.trainer_callback": ("GateCallback",),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME) + ["__version__"]


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'learnmask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
