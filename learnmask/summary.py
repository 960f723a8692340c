"""Summaries of a gated model for TensorBoard: parameters and FLOPs per layer, keep ratios, and
histograms of every gate's ``log_alpha``.

Tags written by :func:`log_summary` (``i`` = layer index, ``g`` = granularity):
    ``parameters/dense``, ``parameters/remaining`` (eval masks), ``parameters/expected``
    (differentiable expectation), ``sparsity/expected_parameters`` in [0, 1],
    ``flops/total`` (one sequence of ``seq_len`` tokens), ``flops/layer_i``,
    ``parameters/layer_i``, ``keep_ratio/g/layer_i`` in [0, 1], histogram ``log_alpha/g``.
"""
from __future__ import annotations

from typing import Protocol

from learnmask.inject.handle import MaskHandle
from learnmask.stats import layer_report


class ScalarWriter(Protocol):
    """What :func:`log_summary` writes to (``torch.utils.tensorboard.SummaryWriter`` fits)."""

    def add_scalar(self, tag: str, value: float, step: int) -> object: ...

    def add_histogram(self, tag: str, values, step: int) -> object: ...


def summary(handle: MaskHandle, *, seq_len: int) -> dict[str, float]:
    """The scalars :func:`log_summary` writes, as a flat ``{tag: value}`` dict.

    Args:
        handle: a gated model.
        seq_len: tokens per sequence for the FLOPs, int >= 1.
    """
    reports = layer_report(handle, seq_len=seq_len)
    values = {
        "parameters/dense": float(handle.dense_parameters()),
        "parameters/remaining": float(handle.remaining_parameters()),
        "parameters/expected": float(handle.expected_remaining_parameters().detach()),
        "sparsity/expected_parameters": float(handle.expected_parameter_sparsity().detach()),
        "flops/total": sum(r.flops_attention + r.flops_ffn for r in reports),
    }
    for index, report in enumerate(reports):
        values[f"flops/layer_{index}"] = report.flops_attention + report.flops_ffn
        values[f"parameters/layer_{index}"] = float(report.parameters)
    for name in handle.gates:
        if name != "hidden":
            for index, keep in enumerate(handle.keep_per_layer(name)):
                values[f"keep_ratio/{name}/layer_{index}"] = keep
    if "hidden" in handle.gates:
        values["keep_ratio/hidden"] = float((handle.eval_masks()["hidden"] > 0).float().mean())
    return values


def log_summary(writer: ScalarWriter, handle: MaskHandle, step: int, *, seq_len: int) -> dict[str, float]:
    """Write :func:`summary` and a ``log_alpha`` histogram per gate at ``step``; return the scalars."""
    values = summary(handle, seq_len=seq_len)
    for tag, value in values.items():
        writer.add_scalar(tag, value, step)
    for name, gate in handle.gates.items():
        writer.add_histogram(f"log_alpha/{name}", gate.log_alpha.detach().float().cpu(), step)
    return values
