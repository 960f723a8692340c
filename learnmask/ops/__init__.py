"""Masked attention: :func:`masked_attention` and its backends.

- :mod:`learnmask.ops.attention`: the op, the backend registry, ``backend="auto"``;
- :mod:`learnmask.ops.base`: :class:`AttentionInputs`, the :class:`AttentionBackend` protocol and
  the semantics every backend reproduces;
- the structured masks kernels evaluate (:class:`MaskStructure`), their row intervals and block
  states live in :mod:`learnmask.masks.structure` and :mod:`learnmask.masks.structure_blocks`:
  ``ops`` imports ``masks``, never the reverse;
- backends: :mod:`~learnmask.ops.reference`, :mod:`~learnmask.ops.sdpa`, :mod:`~learnmask.ops.blocks`,
  :mod:`~learnmask.ops.flex`, :mod:`~learnmask.ops.triton_backend`.

Names are imported on first access, so ``import learnmask.ops`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = ["masked_attention", "register_backend", "get_backend", "auto_order", "backend_reasons",
           "BackendNotSupported", "BackendUnavailable", "choose_backend", "AutoChoice",
           "AttentionInputs", "AttentionBackend", "MaskStructure"]

_HOME = {name: "learnmask.ops.attention" for name in __all__[:9]}
_HOME.update(AttentionInputs="learnmask.ops.base", AttentionBackend="learnmask.ops.base",
             MaskStructure="learnmask.masks.structure")


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'learnmask.ops' has no attribute {name!r}")
