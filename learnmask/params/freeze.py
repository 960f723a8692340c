"""Freezing with the semantics users expect, and gradual unfreezing.

``requires_grad = False`` alone does not stop a parameter from changing: a gradient left from the
last backward is still applied, SGD momentum and Adam moments keep moving it, AdamW keeps decaying
it, and a frozen BatchNorm still updates its running statistics in ``train()`` mode. With
SGD(lr 0.1, momentum 0.9), w = 1 and gradient 1, one step gives w = 0.9; a "frozen" w then goes to
0.71 with the stale gradient, or 0.81 on momentum alone when the gradient is zeroed. :func:`freeze`
stops all of it: the gradient is cleared, the parameter leaves the optimizer (its state dropped),
and normalization layers whose parameters are all frozen keep their running statistics.

Source of gradual unfreezing: ULMFiT (Howard & Ruder, 2018, "Universal Language Model
Fine-tuning for Text Classification").
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

from learnmask.params.select import Predicate, describe_names, layer_parameter_names, select_parameters

log = logging.getLogger(__name__)


def freeze(model: nn.Module, *, layers: int | Sequence[int] | None = None, pattern: str | Sequence[str] | None = None,
           predicate: Predicate | None = None, optimizer: torch.optim.Optimizer | None = None) -> FrozenParameters:
    """Freeze the parameters that :func:`~learnmask.params.select.select_parameters` selects.

    Each one gets ``requires_grad = False`` and ``.grad = None``; with ``optimizer`` (or a later
    ``.attach(optimizer)``) it leaves its param group and its optimizer state (momentum, Adam
    moments) is dropped, so no weight decay or momentum moves it. A module with running statistics
    (BatchNorm*, or any module with ``running_mean`` / ``running_var``) whose own parameters are
    all frozen (for one without parameters: those of its nearest ancestor that has some) is put in
    eval mode before each forward, so ``model.train()`` does not update its statistics.

    Args:
        model: the module; selectors as in ``select_parameters`` (layer indices, a glob or
            ``"re:<regex>"`` pattern or a list of them, ``predicate(name, parameter)``).
        optimizer: an optimizer already built over the parameters, or None.

    Returns:
        a :class:`FrozenParameters` handle: ``unfreeze(...)``, ``attach(optimizer)``, ``remove()``.

    Raises:
        ValueError: as ``select_parameters`` (no selector; a selector matching no parameter).

    Freeze before wrapping the model in DistributedDataParallel, or build DDP with
    ``find_unused_parameters=True``.
    """
    handle = FrozenParameters(model)
    handle._freeze(select_parameters(model, layers=layers, pattern=pattern, predicate=predicate))
    if optimizer is not None:
        handle.attach(optimizer)
    return handle


@dataclasses.dataclass
class _Left:
    """Where a frozen parameter was in an optimizer: its group's index and hyperparameters."""

    group: int
    options: dict


class FrozenParameters:
    """What :func:`freeze` froze, and how to undo it (in part with :meth:`unfreeze`, all with
    :meth:`remove`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._frozen: dict[str, nn.Parameter] = {}
        self._requires_grad: dict[str, bool] = {}  # before freezing, for remove()
        self._optimizers: list[torch.optim.Optimizer] = []
        self._left: list[dict[str, _Left]] = []  # per optimizer: where each frozen parameter was
        self._norm_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._norm_training: dict[str, bool] = {}  # a norm's mode when hooked (restored for the model itself)

    @property
    def names(self) -> list[str]:
        """Qualified names of the parameters frozen now, in model order."""
        return [name for name, _ in self.model.named_parameters() if name in self._frozen]

    @property
    def norms(self) -> list[str]:
        """Names of the modules whose running statistics are kept (eval mode in every forward)."""
        return sorted(self._norm_hooks)

    def __contains__(self, name: str) -> bool:
        return name in self._frozen

    def attach(self, optimizer: torch.optim.Optimizer) -> FrozenParameters:
        """Take the frozen parameters out of ``optimizer`` (state dropped); they return on
        :meth:`unfreeze` to the group they left. Returns ``self``.

        Raises:
            ValueError: ``optimizer`` is already attached.
        """
        if any(optimizer is known for known in self._optimizers):
            raise ValueError(f"this {type(optimizer).__name__} is already attached")
        self._optimizers.append(optimizer)
        self._left.append(_take_out(optimizer, self._frozen))
        return self

    def unfreeze(self, *, layers: int | Sequence[int] | None = None, pattern: str | Sequence[str] | None = None,
                 predicate: Predicate | None = None) -> list[str]:
        """Unfreeze the frozen parameters the selectors pick (all of them without a selector):
        ``requires_grad = True``, back into each attached optimizer in the group they left (fresh
        optimizer state), their norm layers' statistics free again. Returns their names.

        A parameter that was in no group of an attached optimizer joins a new group built from
        the optimizer's defaults (an LR scheduler built earlier does not see that group).

        Raises:
            ValueError: a selector matching no parameter of the model, or none of the frozen ones.
        """
        if layers is None and pattern is None and predicate is None:
            names = self.names
        else:
            picked = select_parameters(self.model, layers=layers, pattern=pattern, predicate=predicate)
            names = [name for name in picked if name in self._frozen]
            if not names:
                raise ValueError(f"the selection ({sorted(picked)[:3]}, ...) holds no frozen parameter; frozen now: "
                                 f"{self.names[:3]}{', ...' if len(self._frozen) > 3 else ''}")
        self._release(names, requires_grad=None)
        return names

    def remove(self) -> None:
        """Undo the freezing: every parameter still frozen gets back its ``requires_grad`` from
        before :func:`freeze` and returns to the optimizer groups it left; norm hooks removed."""
        self._release(self.names, requires_grad=self._requires_grad)
        self._optimizers, self._left = [], []

    def _freeze(self, params: dict[str, nn.Parameter]) -> None:
        for name, param in params.items():
            self._requires_grad.setdefault(name, param.requires_grad)
            param.requires_grad_(False)
            param.grad = None
            self._frozen[name] = param
        for optimizer, left in zip(self._optimizers, self._left):
            left.update(_take_out(optimizer, params))
        self._sync_norms()

    def _release(self, names: list[str], requires_grad: dict[str, bool] | None) -> None:
        params = {name: self._frozen.pop(name) for name in names}
        for name, param in params.items():
            param.requires_grad_(True if requires_grad is None else requires_grad[name])
            self._requires_grad.pop(name, None)
        for optimizer, left in zip(self._optimizers, self._left):
            _put_back(optimizer, params, {name: left.pop(name) for name in names if name in left})
        self._sync_norms()

    def _sync_norms(self) -> None:
        """Hook the running-statistics modules that are frozen now; unhook the others."""
        frozen_ids = {id(param) for param in self._frozen.values()}
        modules = dict(self.model.named_modules())
        keep = {name for name, module in modules.items()
                if _has_running_stats(module) and _is_frozen(name, modules, frozen_ids)}
        for name in set(self._norm_hooks) - keep:
            self._norm_hooks.pop(name).remove()
            was_training = self._norm_training.pop(name)
            modules[name].train(modules[name.rpartition(".")[0]].training if name else was_training)
        for name in keep - set(self._norm_hooks):
            self._norm_hooks[name] = modules[name].register_forward_pre_hook(_keep_running_stats)
            self._norm_training[name] = modules[name].training
            modules[name].train(False)

    def __deepcopy__(self, memo: dict) -> FrozenParameters:
        """A copy over ``deepcopy(model)`` (the same copy when both are in one deepcopy call), with
        the same parameters frozen and norm layers kept, attached to no optimizer: attach it to
        the copy's own optimizer."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = [] if key in ("_optimizers", "_left") else copy.deepcopy(value, memo)
        return new

    def __repr__(self) -> str:
        return (f"FrozenParameters({len(self._frozen)} parameters of {type(self.model).__name__}, "
                f"{len(self._norm_hooks)} norm layers kept in eval, {len(self._optimizers)} optimizers)")


def _keep_running_stats(module: nn.Module, args) -> None:
    """Forward pre-hook: a frozen norm layer normalizes with, and keeps, its running statistics."""
    module.train(False)


def _has_running_stats(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, attr, None), torch.Tensor) for attr in ("running_mean", "running_var"))


def _is_frozen(name: str, modules: dict[str, nn.Module], frozen_ids: set[int]) -> bool:
    """Whether a module's own parameters are all frozen; for one without parameters, those of its
    nearest ancestor that has any."""
    own = list(modules[name].parameters(recurse=False))
    if own:
        return all(id(p) in frozen_ids for p in own)
    while name:
        name = name.rpartition(".")[0]
        params = list(modules[name].parameters())
        if params:
            return all(id(p) in frozen_ids for p in params)
    return False


def _take_out(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, _Left]:
    """Remove ``params`` from the optimizer's groups (empty groups stay, so group indices and LR
    schedulers are unchanged) and drop their state; where each was."""
    names = {id(param): name for name, param in params.items()}
    left: dict[str, _Left] = {}
    for index, group in enumerate(optimizer.param_groups):
        kept = []
        for param in group["params"]:
            name = names.get(id(param))
            if name is None:
                kept.append(param)
                continue
            left[name] = _Left(index, {key: value for key, value in group.items() if key != "params"})
            optimizer.state.pop(param, None)
        group["params"] = kept
    return left


def _put_back(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], left: dict[str, _Left]) -> None:
    """Return each parameter to the group it left (by index: ``load_state_dict`` replaces the group
    dicts but keeps their order); one never held joins a new group of the optimizer's defaults."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    strays = []
    for name, param in params.items():
        if id(param) in held:
            continue
        where = left.get(name)
        if where is not None and where.group < len(optimizer.param_groups):
            optimizer.param_groups[where.group]["params"].append(param)
        else:
            strays.append(name)
    if strays:
        log.warning("%d unfrozen parameters were in no group of %s (%s, ...); they join a new group with its "
                    "defaults", len(strays), type(optimizer).__name__, strays[0])
        optimizer.add_param_group({"params": [params[name] for name in strays]})


class GradualUnfreezing:
    """Unfreeze one transformer layer at a time, from the top (ULMFiT, Howard & Ruder, 2018).

    The caller freezes first and leaves trainable what trains from the start (ULMFiT: the
    classifier head). The units are the transformer layers holding frozen parameters; a frozen
    parameter outside every layer joins the layer before it in model order (BERT's pooler joins
    the top layer), and those before the first layer (the embeddings) are a unit of their own,
    unfrozen last top-down.

    Args:
        frozen: the :class:`FrozenParameters` to release.
        order: ``"top_down"`` (the top layer first) or ``"bottom_up"``.
        every: epochs (or steps) between two unfreezings, an integer >= 1.
        unit: ``"epoch"`` or ``"step"``: what :meth:`step`'s count counts.

    ``step(t)`` makes the first ``t // every`` units trainable (t = 0: none), so with
    ``every=1`` epoch 0 trains the head alone, epoch 1 adds the top layer, and so on.

    Raises:
        ValueError: an unknown order or unit, ``every`` not an integer >= 1, a model without
            recognised transformer layers, nothing frozen.
    """

    def __init__(self, frozen: FrozenParameters, *, order: str = "top_down", every: int = 1, unit: str = "epoch"):
        if order not in ("top_down", "bottom_up"):
            raise ValueError(f"order {order!r} is not 'top_down' or 'bottom_up'")
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit {unit!r} is not 'epoch' or 'step'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}; expected an integer >= 1 ({unit}s between two unfreezings)")
        self.frozen, self.order, self.every, self.unit = frozen, order, every, unit
        self.units = _units(frozen, order)
        self._last: int | None = None
        self._released = 0

    def step(self, t: int) -> list[str]:
        """Bring the schedule to epoch (or step) ``t`` >= 0; returns the names unfrozen now (model order).

        Raises:
            ValueError: ``t`` negative, not an integer, or smaller than the last one given.
        """
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{self.unit} {t!r}; expected an integer >= 0")
        if self._last is not None and t < self._last:
            raise ValueError(f"{self.unit} {t} after {self.unit} {self._last}: gradual unfreezing only moves forward")
        self._last = t
        target = min(len(self.units), t // self.every)
        due = {name for _, unit in self.units[self._released:target] for name in unit}
        names = [name for name in self.frozen.names if name in due]  # model order
        self._released = max(self._released, target)
        if names:
            self.frozen._release(names, requires_grad=None)
        return names

    def schedule(self) -> list[tuple[int, str]]:
        """``[(epoch or step at which it unfreezes, unit label)]`` in order."""
        return [((i + 1) * self.every, label) for i, (label, _) in enumerate(self.units)]


def _units(frozen: FrozenParameters, order: str) -> list[tuple[str, list[str]]]:
    """``[(label, frozen names)]`` in unfreezing order (see :class:`GradualUnfreezing`)."""
    per_layer = layer_parameter_names(frozen.model)
    layer_of = {name: index for index, names in enumerate(per_layer) for name in names}
    below: list[str] = []
    units: list[list[str]] = [[] for _ in per_layer]
    current = None
    for name, _ in frozen.model.named_parameters():
        current = layer_of.get(name, current)
        if name in frozen:
            (below if current is None else units[current]).append(name)
    labelled = [(f"layer {index}", names) for index, names in enumerate(units)]
    labelled = [("below layer 0", below)] + labelled
    labelled = [(label, names) for label, names in labelled if names]
    if not labelled:
        names = dict(frozen.model.named_parameters())
        raise ValueError(f"nothing is frozen in {type(frozen.model).__name__}; freeze first ({describe_names(names)})")
    return labelled[::-1] if order == "top_down" else labelled
