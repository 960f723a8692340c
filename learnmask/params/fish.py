"""FISH masks (Sung, Nair & Raffel 2021, "Training Neural Networks with Fixed Sparse Masks"): a
fixed sparse mask, computed once before training, that lets only the entries with the largest
Fisher information change, under a fixed parameter budget.

The budget is a fraction of ALL entries given (the whole model, as in the paper); parameters that
must train whole, such as a newly initialised classifier head, count INSIDE it: they are kept and
the rest of the budget goes to the top Fisher entries. The paper's code does the same with
``int(total * keep_ratio) - classifier_size``; here the count is ``round(budget * total)``.

Masks are name -> bool tensor of the parameter's shape, True = may change, the form
:class:`~learnmask.params.update.ParameterMasks` enforces at the optimizer update.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from learnmask.functional import topk_mask


def _fraction(value: float, name: str) -> float:
    """``value`` as a float in (0, 1] or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1]; got {value!r}")
    return float(value)


def _total(entries: Mapping[str, Tensor] | int) -> int:
    if isinstance(entries, Mapping):
        return sum(t.numel() for t in entries.values())
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ValueError(f"total must be an int >= 1 or a name -> tensor mapping; got {entries!r}")
    return entries


def _check_fisher(fisher: Mapping[str, Tensor], parameters: Mapping[str, Tensor] | None = None) -> None:
    """Validate Fisher scores (and, if given, that they belong to ``parameters``).

    Raises:
        ValueError: ``fisher`` empty, not a mapping of real tensors, holding NaN; with
            ``parameters``: other names, or a shape that is not the parameter's.
    """
    if not isinstance(fisher, Mapping) or not fisher:
        raise ValueError(f"fisher must be a non-empty name -> tensor mapping; got {fisher!r:.80}")
    for name, score in fisher.items():
        if not isinstance(score, Tensor) or score.dtype == torch.bool or score.is_complex():
            raise ValueError(f"fisher[{name!r}] must be a real tensor; got {type(score).__name__}"
                             f"{'' if not isinstance(score, Tensor) else ' of dtype ' + str(score.dtype)}")
        if torch.isnan(score).any():
            raise ValueError(f"fisher[{name!r}] contains NaN; expected real scores")
    if parameters is None:
        return
    missing, extra = [n for n in parameters if n not in fisher], [n for n in fisher if n not in parameters]
    if missing or extra:
        raise ValueError(f"fisher and parameters name different tensors: missing from fisher {missing}, "
                         f"not among the parameters {extra}")
    for name, score in fisher.items():
        if score.shape != parameters[name].shape:
            raise ValueError(f"fisher[{name!r}] has shape {tuple(score.shape)}; the parameter has shape "
                             f"{tuple(parameters[name].shape)}")


def _keep_count(fraction: float, total: int, name: str = "budget") -> int:
    """``round(fraction * total)`` (Python's round, half to even), at least 1.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or a count that rounds to 0.
    """
    fraction = _fraction(fraction, name)
    count = round(fraction * total)
    if count < 1:
        raise ValueError(f"{name}={fraction!r} of {total:,} entries keeps round({fraction * total:.4g}) = 0; "
                         f"expected at least one (budget_from_count(1, {total}) = {1 / total:.4g})")
    return count


def _top_entries(scores: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """Bool masks keeping exactly ``count`` entries with the largest scores over all tensors jointly.

    Ties: the entry that comes first in the mapping's order, then row-major, is kept first.
    Each mask is on its score's device; the ranking runs on the first score's device.
    """
    names = list(scores)
    device = scores[names[0]].device
    dtype = torch.float32
    for score in scores.values():
        dtype = torch.promote_types(dtype, score.dtype)
    flat = torch.cat([scores[n].detach().reshape(-1).to(device=device, dtype=dtype) for n in names])
    kept = topk_mask(flat, count).split([scores[n].numel() for n in names])
    return {n: k.reshape(scores[n].shape).to(scores[n].device) for n, k in zip(names, kept)}


def budget_from_count(count: int, total: Mapping[str, Tensor] | int) -> float:
    """The budget that keeps exactly ``count`` entries: ``count / total``.

    ``round(budget_from_count(n, t) * t) == n`` for any ``t < 2**52``. For ``n`` entries on top of
    a head of ``h`` entries, pass ``n + h``.

    Args:
        count: entries to keep, an int in [1, total].
        total: the number of entries, or a name -> tensor mapping (a Fisher or the parameters)
            whose entries are counted.

    Raises:
        ValueError: ``count`` outside [1, total]; ``total`` not an int >= 1 or a mapping.
    """
    total = _total(total)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise ValueError(f"count must be an int in [1, total] = [1, {total:,}]; got {count!r}")
    return count / total


def fish_masks(fisher: Mapping[str, Tensor], budget: float, *, always_keep: Iterable[str] | str = (),
               parameters: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """FISH mask (Sung et al. 2021): the ``budget`` fraction of all entries that may change.

    Args:
        fisher: name -> Fisher scores of that parameter's shape (any real values, usually the
            output of :func:`~learnmask.params.fisher.empirical_fisher` with
            ``per_example=True``); every entry counts towards the total.
        budget: fraction of ALL entries of ``fisher`` kept, in (0, 1]; exactly
            ``round(budget * total)`` entries are True.
        always_keep: names kept whole (e.g. the new classifier head's weight and bias), counted
            inside the budget; a single str is one name.
        parameters: if given, name -> parameter the masks are for; the names and shapes of
            ``fisher`` must match them (a Fisher from another model fails here).

    Returns:
        name -> bool mask of the Fisher's shape and device, in ``fisher``'s order, True = may
        change; ``always_keep`` all True, the rest of the budget on the largest Fisher values
        (ties: earlier name, then row-major, first).

    Raises:
        ValueError: budget outside (0, 1] or keeping 0 entries; ``always_keep`` names not in
            ``fisher``; ``always_keep`` alone larger than the budget (the message gives both
            counts); ``fisher`` empty, not real tensors or holding NaN; with ``parameters``,
            other names or shapes than theirs.
    """
    _check_fisher(fisher, parameters)
    keep = [always_keep] if isinstance(always_keep, str) else list(dict.fromkeys(always_keep))
    unknown = [n for n in keep if n not in fisher]
    if unknown:
        raise ValueError(f"always_keep names {unknown} are not in fisher; its names: {', '.join(fisher)}")
    total = _total(fisher)
    count = _keep_count(budget, total)
    whole = sum(fisher[n].numel() for n in keep)
    if whole > count:
        raise ValueError(f"always_keep {keep} holds {whole:,} entries, more than the budget: round({budget!r} * "
                         f"{total:,}) = {count:,}; raise budget to at least "
                         f"budget_from_count({whole}, {total}) = {whole / total!r} or keep fewer parameters whole")
    rest = {n: s for n, s in fisher.items() if n not in keep}
    chosen = _top_entries(rest, count - whole) if rest else {}
    return {n: torch.ones(s.shape, dtype=torch.bool, device=s.device) if n in keep else chosen[n]
            for n, s in fisher.items()}
