"""What the learnable parameter masks share: choosing the parameters, putting a parametrization on
each and taking it off bit for bit, checks at ``load_state_dict``, and the export to plain weights.

A learnable parameter mask is a ``torch.nn.utils.parametrize`` parametrization on one parameter
(never a fork of the model's class): piggyback weight masks (:mod:`learnmask.params.weight_mask`)
and diff masks (:mod:`learnmask.params.diff_mask`). Because the masks live in the model as
submodules, the masked model

* deep-copies (``copy.deepcopy(model)``; :meth:`ParamMaskHandle.from_model` finds the copy's
  handle), and a copy can be un-masked without touching the original;
* saves with ``model.state_dict()`` and loads into a model masked by the same ``apply_*`` call
  on a fresh base model (``strict=True``); a mask whose shape does not fit its parameter is a
  ``ValueError`` naming the parameter, the expected and the loaded shape;
* exports to plain weights (:func:`export_weights`) that load with ``strict=True`` into the
  unmodified model class.

Shape legend: ``(*p)`` is the shape of the masked parameter ``p``.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["ParamMaskHandle", "export_weights", "resolve_parameter_names"]


def _close_names(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f"close names: {', '.join(close)}" if close else f"its parameters include: {', '.join(known[:6])}"


def resolve_parameter_names(model: nn.Module, parameters: Iterable[str]) -> list[tuple[str, nn.Module, str]]:
    """Validate qualified parameter names of ``model``; return ``(name, owner module, attribute)``.

    Args:
        model: the model to mask.
        parameters: names as ``model.named_parameters()`` gives them, e.g. ``["0.weight"]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``parameters`` is one str or holds a non-str.
        ValueError: empty, a name twice, a name not in ``model`` (the message lists close names),
            a name already parametrized, a parameter shared under several names (tied weights:
            masking one name would leave the others unmasked), or a non-floating parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(parameters, str):
        raise TypeError(f"parameters must be a list of names; got the str {parameters!r} (wrap it: [{parameters!r}])")
    names = list(parameters)
    if not names:
        raise ValueError("parameters is empty; expected at least one qualified parameter name, e.g. ['0.weight']")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"parameters must be names (str) from model.named_parameters(); got {bad[:3]!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"parameters names {twice} more than once; expected each name once")
    named = dict(model.named_parameters())
    aliases: dict[int, list[str]] = {}
    for alias, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(alias)
    chosen = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        if name not in named:
            owner = _submodule(model, owner_name)
            if owner is not None and parametrize.is_parametrized(owner, attr):
                kinds = [type(p).__name__ for p in owner.parametrizations[attr]]
                raise ValueError(f"{name} is already parametrized ({', '.join(kinds)}); one learnable mask per "
                                 "parameter: remove() the other first")
            raise ValueError(f"{name!r} is not a parameter of {type(model).__name__}; "
                             f"{_close_names(name, list(named))}")
        param = named[name]
        shared = aliases[id(param)]
        if len(shared) > 1:
            raise ValueError(f"{name} is one tensor shared under the names {shared} (tied weights); a mask on one name "
                             "would leave the others unmasked: untie them or choose another parameter")
        if not param.is_floating_point():
            raise ValueError(f"{name} has dtype {param.dtype}; expected a floating-point parameter")
        chosen.append((name, _submodule(model, owner_name), attr))
    return chosen


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def attach(module: nn.Module, attr: str, mask: nn.Module) -> None:
    """Register ``mask`` on ``module.<attr>`` and freeze the base tensor; record how to undo it.

    ``mask.base_requires_grad`` and ``mask.parameter_order`` (plain attributes, deep-copied with
    the mask) let :func:`detach` restore the flag and the order of ``module._parameters``.
    """
    base = module._parameters[attr]
    mask.base_requires_grad = base.requires_grad
    # the order before any mask: a tensor parametrized earlier has left module._parameters
    earlier = [p.parameter_order for plist in getattr(module, "parametrizations", {}).values() for p in plist
               if hasattr(p, "parameter_order")]
    mask.parameter_order = earlier[0] if earlier else list(module._parameters)
    # unsafe: the shape is unchanged by construction, and the safe check would run the mask once
    # (a diff mask in training mode would draw a sample, consuming the global RNG at apply time)
    parametrize.register_parametrization(module, attr, mask, unsafe=True)
    base.requires_grad_(False)


def detach(module: nn.Module, attr: str, mask: nn.Module) -> None:
    """Take ``mask`` off ``module.<attr>``: the base Parameter object is back, bits, flag and order."""
    # a deep copy shares the class that parametrize injected; give this module its own first, so
    # that taking the mask off one of them leaves the other intact
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    rank = {key: i for i, key in enumerate(mask.parameter_order)}
    ordered = sorted(module._parameters.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    module._parameters.clear()
    module._parameters.update(ordered)
    module._parameters[attr].requires_grad_(mask.base_requires_grad)


def check_loaded_shapes(mask: nn.Module, state_dict: dict, prefix: str, keys: Iterable[str]) -> None:
    """Raise ``ValueError`` if ``state_dict`` holds one of ``mask``'s tensors ``keys`` in another shape.

    Called from the masks' ``_load_from_state_dict``, so the error names the masked parameter
    (``mask.target``), the expected shape and the loaded one.
    """
    for key in keys:
        loaded = state_dict.get(prefix + key)
        expected = getattr(mask, key).shape
        if isinstance(loaded, Tensor) and loaded.shape != expected:
            raise ValueError(
                f"{type(mask).__name__} of {mask.target}: the state dict's {prefix}{key} has shape "
                f"{tuple(loaded.shape)}; expected {tuple(expected)}, the shape of {mask.target} in this model. "
                "Load a state dict saved from a model masked the same way, with the same architecture")


class ParamMaskHandle:
    """The handle of learnable masks on named parameters of one model (base class).

    Subclasses set ``mask_class`` (the parametrization) and add their own methods. The handle
    holds only the model and the names: every mask is looked up in the model, so a deep copy
    of the model has an equal handle through :meth:`from_model`, and ``copy.deepcopy(handle)``
    copies the model with it.

    Attributes:
        model: the masked model.
        names: the masked parameters' qualified names, in the order given to ``apply_*``.
    """

    mask_class: ClassVar[type[nn.Module]]

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = tuple(names)
        self._removed = False

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamMaskHandle:
        """The handle of the masks of this kind found on ``model`` (e.g. on a deep copy).

        Raises:
            ValueError: ``model`` carries no mask of this kind.
        """
        names = [f"{owner}.{attr}" if owner else attr
                 for owner, module in model.named_modules() if parametrize.is_parametrized(module)
                 for attr, plist in module.parametrizations.items()
                 if any(isinstance(p, cls.mask_class) for p in plist)]
        if not names:
            raise ValueError(f"{type(model).__name__} carries no {cls.mask_class.__name__}; apply the masks first")
        return cls(model, names)

    def masks(self) -> dict[str, nn.Module]:
        """name -> the parametrization module masking it.

        Raises:
            RuntimeError: the handle was removed, or a mask is no longer on the model.
        """
        if self._removed:
            raise RuntimeError(f"this {type(self).__name__} was removed; apply the masks again")
        found = {}
        for name in self.names:
            owner_name, _, attr = name.rpartition(".")
            owner = _submodule(self.model, owner_name)
            plist = owner.parametrizations[attr] if owner is not None and parametrize.is_parametrized(owner, attr) \
                else []
            mask = next((p for p in plist if isinstance(p, self.mask_class)), None)
            if mask is None:
                raise RuntimeError(f"{name} carries no {self.mask_class.__name__} any more; was it removed "
                                   "by another handle or by parametrize.remove_parametrizations?")
            found[name] = mask
        return found

    @property
    def total(self) -> int:
        """Entries under a mask, summed over the masked parameters (an int > 0)."""
        return sum(mask.numel_masked for mask in self.masks().values())

    def export(self) -> dict[str, Tensor]:
        """Plain weights for the unmodified model class: :func:`export_weights` of this handle."""
        return export_weights(self)

    def remove(self) -> None:
        """Take every mask off: the model is bit-identical to the one the masks were put on.

        Each masked name holds its original Parameter object again, with its values, its
        ``requires_grad`` flag and its place in the module's parameter order; the modules have
        their own class back. The masks' trained state is dropped (use :meth:`export` first to
        keep the trained weights).

        Raises:
            RuntimeError: removed already.
            ValueError: another parametrization was stacked on a masked parameter since.
        """
        masks = self.masks()
        for name, mask in masks.items():
            _only_mask_on(self.model, name, mask)
        for name, mask in masks.items():
            owner_name, _, attr = name.rpartition(".")
            detach(self.model.get_submodule(owner_name), attr, mask)
        self._removed = True


def _only_mask_on(model: nn.Module, name: str, mask: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    plist = model.get_submodule(owner_name).parametrizations[attr]
    if len(plist) != 1:
        kinds = [type(p).__name__ for p in plist]
        raise ValueError(f"{name} carries the parametrizations {kinds}; expected only its {type(mask).__name__}: "
                         "remove the others first")


def export_weights(handle: ParamMaskHandle) -> dict[str, Tensor]:
    """The masked model's weights as a plain state dict of its unmodified class.

    Each masked parameter ``name`` becomes one tensor ``(*p)``: the weight the masked model uses
    in eval mode, computed by the same expression as its forward (``w0 * mask`` for weight
    masks; ``w0 + z ⊙ delta`` with the deterministic or fixed ``z`` for diff masks), so the
    plain model loaded with it gives bit-identical outputs. The mask's own tensors (scores,
    delta, log_alpha, ...) are left out; every other entry is ``model.state_dict()``'s (same
    storage, as ``state_dict()`` gives it).

    Args:
        handle: a :class:`ParamMaskHandle` (weight or diff masks), or the
            :class:`~learnmask.inject.MaskHandle` of ``apply_masks`` (its ``export_weights()``).

    Returns:
        ``dict[str, Tensor]`` that loads with ``load_state_dict(..., strict=True)`` into the
        model's class built as the base model was (the model carries no other parametrization).

    Raises:
        TypeError: ``handle`` is not a ParamMaskHandle.
        RuntimeError: the handle was removed.
        ValueError: another parametrization is stacked on a masked parameter.
    """
    from learnmask.inject.handle import MaskHandle  # here: learnmask.inject reaches params lazily too

    if isinstance(handle, MaskHandle):
        return handle.export_weights()  # the front door's handle: both mask kinds at once
    if not isinstance(handle, ParamMaskHandle):
        raise TypeError(f"export_weights expects the handle of apply_weight_masks or apply_diff_masks; "
                        f"got {type(handle).__name__}")
    masks = handle.masks()
    prefixes = {}
    for name, mask in masks.items():
        _only_mask_on(handle.model, name, mask)
        owner_name, _, attr = name.rpartition(".")
        prefixes[f"{owner_name}.parametrizations.{attr}." if owner_name else f"parametrizations.{attr}."] = name
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, value in handle.model.state_dict().items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                out[key] = value
            elif key == prefix + "original":
                name = prefixes[prefix]
                out[name] = masks[name].plain(value).detach()
    return out
