"""Plug gates into a model as it is, with hooks (never by forking its classes)."""
from learnmask.inject.heads import AttentionBlock, HeadGateHandle, apply_head_gates, find_attention_blocks

__all__ = ["AttentionBlock", "HeadGateHandle", "apply_head_gates", "find_attention_blocks"]
