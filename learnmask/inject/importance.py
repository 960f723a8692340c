"""Fixed baselines for ablations: which units to keep by random choice, weight magnitude or
gradient importance, turned into :class:`~learnmask.gates.FixedGate` s on a :class:`MaskHandle`.

* magnitude: the L2 norm of every weight a unit owns (a head's q/k/v rows and output-projection
  columns; an FFN unit's up rows and down column), the usual magnitude-pruning criterion (Han
  et al. 2015, applied per structure).
* importance: ``Σ_batches |∂L/∂z|`` at the current gates (Michel, Levy & Neubig 2019, "Are
  Sixteen Heads Really Better than One?"), for any granularity.

Legend: ``L`` layers, ``H`` heads, ``I`` FFN units, ``d`` hidden size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from einops import rearrange
from torch import Tensor

from learnmask.functional import topk_mask
from learnmask.gates import FixedGate
from learnmask.inject.handle import MaskHandle
from learnmask.inject.layout import weight_out_in

BASELINES = ("open", "random", "magnitude", "importance")


def _rows(module, offset: int, width: int) -> Tensor:
    return weight_out_in(module)[offset:offset + width].detach().float().pow(2).sum(dim=1)


@torch.no_grad()
def magnitude_scores(handle: MaskHandle, name: str) -> Tensor:
    """Squared-L2 weight mass of each unit of granularity ``name`` ("heads" or "ffn").

    Returns:
        Scores of the gate's shape, ``(L, H)`` or ``(L, I)``, >= 0.

    A head's mass covers its q/k/v rows and output columns; for a stock
    ``nn.MultiheadAttention`` and a ``target_modules`` block without ``qkv_modules``, whose q/k/v
    rows learnmask does not read, only the output columns.

    Raises:
        ValueError: another granularity.
    """
    scores = []
    for layer in handle.layers:
        if name == "heads":
            att = layer.attention
            per_head = rearrange(weight_out_in(att.out).detach().float().pow(2).sum(dim=0), "(h e) -> h e",
                                 h=att.num_heads).sum(dim=1)
            if att.q is not None:
                width = att.num_heads * att.head_dim
                kv_width = att.num_kv_heads * att.head_dim
                q = rearrange(_rows(att.q.module, att.q.offset, width), "(h e) -> h e", h=att.num_heads).sum(dim=1)
                kv = _rows(att.k.module, att.k.offset, kv_width) + _rows(att.v.module, att.v.offset, kv_width)
                kv = rearrange(kv, "(g e) -> g e", g=att.num_kv_heads).sum(dim=1)
                per_head = per_head + q + kv.repeat_interleave(att.num_heads // att.num_kv_heads)
            scores.append(per_head)
        elif name == "ffn":
            ffn = layer.ffn
            per_unit = weight_out_in(ffn.down).detach().float().pow(2).sum(dim=0)
            for up in ffn.up:
                per_unit = per_unit + weight_out_in(up).detach().float().pow(2).sum(dim=1)
            scores.append(per_unit)
        else:
            raise ValueError(f"magnitude scores cover 'heads' and 'ffn'; got {name!r}")
    return torch.stack(scores)


def gradient_importance(handle: MaskHandle, batches: Iterable[dict],
                        loss_fn: Callable[[object, dict], Tensor] | None = None) -> dict[str, Tensor]:
    """``Σ_batches |∂L/∂z|`` for every gate of ``handle`` (Michel, Levy & Neubig 2019).

    Args:
        handle: a gated model; its gates' current values are where the gradient is taken
            (all-open gates: the importance of each unit in the dense model).
        batches: keyword inputs of the model, one dict per batch.
        loss_fn: ``(output, batch) -> loss``; default ``output.loss`` (batches carry labels).

    Returns:
        name -> scores of that gate's shape, >= 0. The model's parameter gradients are cleared.
    """
    model = handle.model
    totals = {name: torch.zeros(gate.shape) for name, gate in handle.gates.items()}
    handle.capture_grad = True
    try:
        for batch in batches:
            output = model(**batch)
            loss = output.loss if loss_fn is None else loss_fn(output, batch)
            loss.backward()
            for name in totals:
                totals[name] += handle.z[name].grad.detach().abs().float().cpu()
    finally:
        handle.capture_grad = False
        model.zero_grad(set_to_none=True)
    return totals


def keep_top(scores: Tensor, keep_ratio: float, *, per_layer: bool = True) -> Tensor:
    """Bool mask keeping the highest scores: ``round(keep_ratio * n)`` per row (``per_layer``) or
    over all elements; at least one unit per row/overall (ties: lower index first).

    Raises:
        ValueError: keep_ratio outside (0, 1].
    """
    if not 0.0 < float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1]; got {keep_ratio!r}")
    if not per_layer or scores.dim() == 1:
        return topk_mask(scores, max(1, round(keep_ratio * scores.numel())))
    keep = max(1, round(keep_ratio * scores.shape[1]))
    return torch.stack([topk_mask(row, keep) for row in scores])


def set_baseline(handle: MaskHandle, kind: str, keep_ratio: float | Mapping[str, float], *, per_layer: bool = True,
                 batches: Iterable[dict] | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Replace every gate of ``handle`` by a :class:`FixedGate` chosen by ``kind``.

    Args:
        kind: "open" (all kept), "random", "magnitude" (heads/ffn) or "importance" (needs
            ``batches``; taken at the gates as they are now).
        keep_ratio: fraction of units kept, in (0, 1] (ignored by "open"); one for every
            granularity, or a mapping name -> ratio (granularities left out stay all open).
        per_layer: keep that fraction in every layer (True) or over all layers jointly.
        batches: model inputs for "importance".
        generator: CPU generator for "random".

    Returns:
        name -> the bool mask set.

    Raises:
        ValueError: unknown kind, keep_ratio outside (0, 1], "importance" without batches.
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
    if kind == "importance" and batches is None:
        raise ValueError("the importance baseline needs batches=[...] of model inputs")
    scores = gradient_importance(handle, batches) if kind == "importance" else {}
    masks = {}
    ratios = keep_ratio if isinstance(keep_ratio, Mapping) else {name: keep_ratio for name in handle.gates}
    unknown = sorted(set(ratios) - set(handle.gates))
    if unknown:
        raise ValueError(f"keep_ratio given for {unknown}; gated: {', '.join(handle.gates)}")
    for name, gate in handle.gates.items():
        if kind == "open" or name not in ratios:
            masks[name] = torch.ones(gate.shape, dtype=torch.bool)
            continue
        if kind == "random":
            score = torch.rand(gate.shape, generator=generator)
        else:
            score = scores[name] if kind == "importance" else magnitude_scores(handle, name)
        masks[name] = keep_top(score, ratios[name], per_layer=per_layer)
    for name, mask in masks.items():
        handle.set_gate(name, FixedGate(mask))
    return masks
