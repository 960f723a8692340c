"""Plug gates into a model as it is, with hooks, parametrizations and learnmask's attention
function (never by forking its classes).

``apply_masks`` gates heads, FFN units, hidden dimensions and whole blocks of every supported
architecture and returns a :class:`MaskHandle`; ``apply_head_gates`` is its heads-only form.
"""
from learnmask.inject.architectures import SUPPORTED, LayerSpec, find_layers
from learnmask.inject.config import ATTENTION_MODES, GRANULARITIES, MaskConfig
from learnmask.inject.handle import MaskHandle
from learnmask.inject.heads import apply_head_gates
from learnmask.inject.hf_attention import AttentionPath
from learnmask.inject.masks import apply_masks

__all__ = [
    "apply_head_gates", "ATTENTION_MODES", "AttentionPath",
    "GRANULARITIES", "MaskConfig", "MaskHandle", "apply_masks", "LayerSpec", "find_layers", "SUPPORTED",
]
