"""Child-Tuning gradient masks (Xu et al. 2021, "Raise a Child in Large Language Model: Towards
Effective and Generalizable Fine-tuning"): only a "child network" of the entries is updated.

* Child-Tuning-F (task-free): a fresh Bernoulli(p) mask every step; kept gradients are scaled by
  ``1/p`` so the masked gradient is unbiased. :class:`ChildTuningF`.
* Child-Tuning-D (task-driven): one fixed mask, the top ``keep`` fraction of the Fisher
  information over all given parameters jointly, without rescaling. :func:`child_tuning_d_masks`.

Masks are name -> bool tensor of the parameter's shape, True = may change, the form
:class:`~learnmask.params.update.ParameterMasks` enforces at the optimizer update.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from learnmask.params.fish import _check_fisher, _fraction, _keep_count, _top_entries
from learnmask.sampling import generator_for


class MaskTarget(Protocol):
    """What :meth:`ChildTuningF.step_masks` drives (e.g. ``ParameterMasks``)."""

    def set_masks(self, masks: dict[str, Tensor], grad_scale: float | None = None) -> None: ...


class ChildTuningF:
    """Child-Tuning-F (Xu et al. 2021): every entry's gradient kept with probability ``p`` each
    step, the kept ones scaled by ``1/p``.

    Args:
        parameters: name -> parameter (or any tensor of its shape) to mask; a non-empty mapping.
        p: keep probability (the paper's ``p_F``, its code's ``reserve_p``), in (0, 1]; 1 keeps
            everything (plain fine-tuning).
        generator: a ``torch.Generator`` for the draws (seed it for reproducible masks; seed it
            the same on every DDP rank so the ranks agree); masks are drawn on its device and
            moved to each parameter's. Default: the training step's shared generator inside
            :func:`learnmask.sampling.step_sampling` (the shared loop opens one each step: the
            same masks on every DDP rank), else the global RNG on each parameter's device.

    Raises:
        ValueError: ``p`` outside (0, 1]; ``parameters`` empty or not name -> tensor.
        TypeError: ``generator`` not a ``torch.Generator``.
    """

    def __init__(self, parameters: Mapping[str, Tensor], p: float, generator: torch.Generator | None = None):
        if not isinstance(parameters, Mapping) or not parameters:
            raise ValueError(f"parameters must be a non-empty name -> parameter mapping; got {parameters!r:.80}")
        bad = [name for name, t in parameters.items() if not isinstance(t, Tensor)]
        if bad:
            raise ValueError(f"parameters {bad} are not tensors; expected name -> parameter")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.parameters = dict(parameters)
        self.p = _fraction(p, "p")
        self.generator = generator

    @property
    def grad_scale(self) -> float:
        """``1/p``, the factor on every kept gradient entry."""
        return 1.0 / self.p

    def sample(self) -> tuple[dict[str, Tensor], float]:
        """Draw one step's masks.

        Returns:
            ``(masks, grad_scale)``: name -> bool tensor of the parameter's shape and device,
            each entry True independently with probability ``p``; and ``1/p``.
        """
        masks = {}
        for name, param in self.parameters.items():
            generator = self.generator or generator_for(param.device)  # None: torch's global generator
            device = param.device if generator is None else generator.device
            uniform = torch.rand(param.shape, generator=generator, device=device)
            masks[name] = (uniform < self.p).to(param.device)
        return masks, self.grad_scale

    def step_masks(self, target: MaskTarget) -> tuple[dict[str, Tensor], float]:
        """Draw this step's masks and hand them to ``target.set_masks(masks, grad_scale=1/p)``.

        Call once per optimizer step, before it. Returns what was set (for logging).
        """
        masks, grad_scale = self.sample()
        target.set_masks(masks, grad_scale=grad_scale)
        return masks, grad_scale


def child_tuning_d_masks(fisher: Mapping[str, Tensor], keep: float, *,
                         parameters: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Child-Tuning-D's child network (Xu et al. 2021): the ``keep`` fraction of all entries with
    the largest Fisher information, chosen over all given parameters jointly.

    The reference code thresholds at the ``(1 - keep)`` percentile with ``>=``, which keeps every
    tie at the threshold; here exactly ``round(keep * total)`` entries are kept, ties broken by
    order (earlier name, then row-major, first). The mask is fixed for the whole run and the kept
    gradients are not rescaled (``set_masks(masks)``, no ``grad_scale``). Which parameters to give
    is the caller's choice (the reference code masks only the encoder layers).

    Args:
        fisher: name -> Fisher scores of that parameter's shape, e.g. from
            :func:`~learnmask.params.fisher.empirical_fisher` (the paper's per-batch estimate).
        keep: fraction of all entries kept (the paper's ``p_D``), in (0, 1].
        parameters: if given, the names and shapes ``fisher`` must match.

    Returns:
        name -> bool mask of the Fisher's shape and device, in ``fisher``'s order, True = may
        change; exactly ``round(keep * total)`` True entries in all.

    Raises:
        ValueError: ``keep`` outside (0, 1] or keeping 0 entries; ``fisher`` empty, not real
            tensors or holding NaN; with ``parameters``, other names or shapes than theirs.
    """
    _fraction(keep, "keep")
    _check_fisher(fisher, parameters)
    count = _keep_count(keep, sum(s.numel() for s in fisher.values()), "keep")
    return _top_entries(fisher, count)
