"""The diagonal empirical Fisher information of a model's parameters: which entries the task's loss
is most sensitive to. Child-Tuning-D (Xu et al. 2021, "Raise a Child in Large Language Model")
and FISH masks (Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks") keep
the entries with the largest values (see :mod:`learnmask.params.child_tuning` and
:mod:`learnmask.params.fish`).

Two estimates, both ``>= 0`` and of each parameter's shape:

* per batch (``per_example=False``, the default):
  ``F = (1/M) Σ_b (∂L_b/∂θ)²`` over ``M`` batches, ``L_b`` the batch's (mean) loss. This is what
  Child-Tuning-D's reference code computes (its paper writes the per-example sum).
* per example (``per_example=True``): ``F = (1/N) Σ_i (∂ℓ_i/∂θ)²`` over all ``N`` examples,
  ``ℓ_i`` one example's loss, i.e. ``-log p(y_i | x_i)`` for a classifier. This is the textbook
  empirical Fisher, and what FISH computes (its code feeds batches of one example).

The two differ: squaring the gradient of a batch mean drops the spread of the per-example
gradients (``(mean g)² <= mean(g²)``, so for batches of equal size the per-batch values are never
larger), and ranks entries by their average pull rather than by how strongly single examples pull
them. With one example per batch they coincide. The per-example estimate costs one backward pass
per example.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice

import torch
from torch import Tensor, nn

from learnmask import distributed


def _chosen(model: nn.Module, parameters: Mapping[str, Tensor] | Iterable[str] | None) -> dict[str, Tensor]:
    """name -> parameter of ``model`` whose Fisher is wanted (validated)."""
    named = dict(model.named_parameters())
    model_name = type(model).__name__
    if parameters is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(f"no parameter of {model_name} requires grad; pass parameters=[...] and unfreeze them")
        return chosen
    if isinstance(parameters, str):
        raise TypeError(f"parameters must be a collection of names or a name -> parameter mapping; got the str "
                        f"{parameters!r} (wrap it: [{parameters!r}])")
    if isinstance(parameters, Mapping):
        owned = {id(p) for p in model.parameters()}
        foreign = [name for name, p in parameters.items() if id(p) not in owned]
        if foreign:
            raise ValueError(f"parameters {foreign} are not parameters of this {model_name}; expected tensors "
                             f"from model.named_parameters()")
        chosen = dict(parameters)
    else:
        names = list(parameters)
        unknown = [name for name in names if name not in named]
        if unknown:
            known = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(f"parameters {unknown} are not in {model_name}; its parameters: {known}")
        chosen = {name: named[name] for name in names}
    if not chosen:
        raise ValueError("parameters is empty; expected at least one parameter name")
    frozen = [name for name, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameters {frozen} do not require grad; their Fisher needs a gradient "
                         f"(unfreeze them or leave them out)")
    return chosen


def _losses(loss: object, per_example: bool, index: int) -> tuple[Tensor, ...]:
    """The loss(es) of batch ``index`` to differentiate, one per example or one per batch."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn returned {type(loss).__name__} for batch {index}; expected a Tensor")
    if per_example and loss.dim() != 1:
        raise ValueError(f"loss_fn returned shape {tuple(loss.shape)} for batch {index}; per_example=True expects "
                         f"per-example losses of shape (B,) (reduction='none')")
    if not per_example and loss.dim() != 0:
        raise ValueError(f"loss_fn returned shape {tuple(loss.shape)} for batch {index}; expected a scalar loss "
                         f"(shape ()); for per-example losses of shape (B,) pass per_example=True")
    if not loss.requires_grad:
        raise ValueError(f"the loss of batch {index} does not require grad (computed under torch.no_grad, or "
                         f"from no trainable parameter?)")
    return tuple(loss.unbind(0)) if per_example else (loss,)


def empirical_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor], *,
                     parameters: Mapping[str, Tensor] | Iterable[str] | None = None, num_batches: int | None = None,
                     per_example: bool = False) -> dict[str, Tensor]:
    """Diagonal empirical Fisher information of ``parameters`` on ``batches`` (see the module doc).

    Child-Tuning-D (Xu et al. 2021) uses the per-batch estimate, FISH (Sung et al. 2021) the
    per-example one (``per_example=True``).

    Args:
        model: any ``nn.Module``. The gradients are taken in eval mode (no dropout, normalization
            statistics read and not updated), so the estimate is deterministic and the model's
            buffers do not change; every module's mode is restored afterwards. (Child-Tuning's
            reference code computes with dropout on.)
        batches: an iterable of batches, each passed to ``loss_fn`` as is.
        loss_fn: ``(model, batch) -> loss``: a scalar (shape ``()``, the batch's mean loss), or
            with ``per_example=True`` the unreduced per-example losses, shape ``(B,)``. Examples
            must not interact through the model (true in eval mode for the usual layers).
        parameters: which parameters: names from ``model.named_parameters()`` or a mapping
            name -> parameter of ``model`` (the keys name the result). Default: every parameter
            that requires grad. A parameter the loss does not reach gets a Fisher of zeros.
        num_batches: use the first ``num_batches`` batches, an int >= 1; default all of them.
        per_example: the per-example estimate (one backward pass per example) instead of the
            per-batch one.

    Returns:
        name -> Fisher of that parameter's shape, ``>= 0``, detached, on the parameter's device,
        accumulated in float32 (float64 for float64 parameters). Units: squared loss units per
        squared parameter unit. The parameters' ``.grad`` are not touched (gradients are taken
        with ``torch.autograd.grad``; tensor hooks on the parameters do see them). Under
        ``torch.distributed`` (two or more ranks) the estimate is averaged over ranks
        (:func:`learnmask.distributed.mean_`) before it is returned, so every rank thresholds the
        same scores: give each rank its own share of the batches (the same number of terms on
        each) for the Fisher of all of them, or the same batches on every rank.

    Raises:
        ValueError: ``num_batches`` not an int >= 1; no batches, or fewer than ``num_batches``;
            unknown, foreign or frozen ``parameters``; a loss of the wrong shape or without grad;
            a non-finite Fisher (a NaN or inf gradient).
        TypeError: ``loss_fn`` returned no Tensor; ``parameters`` a single str.
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be an int >= 1 (or None for all batches); got {num_batches!r}")
    chosen = _chosen(model, parameters)
    params = list(chosen.values())
    totals = {name: torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
              for name, p in chosen.items()}
    modes = [(module, module.training) for module in model.modules()]
    seen = terms = 0
    model.eval()
    try:
        with torch.enable_grad():
            for batch in (batches if num_batches is None else islice(batches, num_batches)):
                seen += 1
                losses = _losses(loss_fn(model, batch), per_example, seen - 1)
                for i, loss in enumerate(losses):
                    grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
                    for total, grad in zip(totals.values(), grads):
                        if grad is not None:
                            grad = grad.detach().to(total.dtype)
                            total.addcmul_(grad, grad)
                    terms += 1
    finally:
        for module, training in modes:
            module.training = training
    if seen == 0:
        raise ValueError("batches is empty; the empirical Fisher needs at least one batch")
    if num_batches is not None and seen < num_batches:
        raise ValueError(f"num_batches={num_batches} but batches gave only {seen}")
    if terms == 0:
        raise ValueError(f"the {seen} batch(es) held no example (per-example losses of shape (0,))")
    for total in totals.values():  # every rank reduces every total before any rank may raise below
        distributed.mean_(total.div_(terms))
    for name, total in totals.items():
        if not torch.isfinite(total).all():
            raise ValueError(f"the Fisher of {name!r} is not finite: a NaN or inf gradient in the batches")
    return totals
