"""Plug gates into a model as it is, with hooks and parametrizations (never by forking its classes).

``apply_head_gates`` gates attention heads only (the API the training recipe uses);
``apply_masks`` gates heads, FFN units, hidden dimensions and whole blocks of every supported
architecture and returns a :class:`MaskHandle`.
"""
from learnmask.inject.architectures import SUPPORTED, LayerSpec, find_layers
from learnmask.inject.config import GRANULARITIES, MaskConfig
from learnmask.inject.heads import AttentionBlock, HeadGateHandle, apply_head_gates, find_attention_blocks
from learnmask.inject.masks import MaskHandle, apply_masks

__all__ = [
    "AttentionBlock", "HeadGateHandle", "apply_head_gates", "find_attention_blocks",
    "GRANULARITIES", "MaskConfig", "MaskHandle", "apply_masks", "LayerSpec", "find_layers", "SUPPORTED",
]
