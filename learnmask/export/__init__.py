"""Export a gated model: bake its masks in and physically remove what they closed
(:func:`finalize`), then save and load the pruned model as safetensors + JSON, no pickle
(:func:`save_pruned`, :func:`load_pruned`)."""
from learnmask.export.finalize import finalize
from learnmask.export.save import load_pruned, save_pruned

__all__ = ["finalize", "save_pruned", "load_pruned"]
