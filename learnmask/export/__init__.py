"""Export a gated model: bake its masks in and physically remove what they closed."""
from learnmask.export.finalize import finalize

__all__ = ["finalize"]
