"""Per-element parameter masks that hold at the optimizer update, not only at the gradient.

Masking ``p.grad`` alone (what the reference code of Child-Tuning-D, FISH and composable-sft does)
does not keep a masked entry still: AdamW's decoupled weight decay and any momentum or Adam moment
built before the mask keep moving it (diffusers #1009: a masked embedding drifted from 0.0368 to
0.0347 over 3,000 AdamW steps). :class:`ParameterMasks` hooks the optimizer's step instead: before
it, masked gradients are zeroed (kept ones optionally scaled) and the masked values copied; after
it, the copies are written back, so masked entries are bit-identical after any number of steps of
any optimizer. In ``mode="zero"`` masked entries are zero and written back as zero after every
step: a sparse network stays exactly as sparse (one that was not re-applied went from 80% to 98%
dense in a public report).

Sources: Child-Tuning (Xu et al., 2021, "Raise a Child in Large Language Model"), FISH masks
(Sung et al., 2021, "Training Neural Networks with Fixed Sparse Masks").
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from learnmask.params.select import describe_names

MODES = ("hold", "zero")


class ParameterMasks:
    """Boolean masks over a model's parameters, enforced at each optimizer step.

    ``masks[name]`` has the parameter's shape; ``True`` = the entry may change, ``False`` = it is
    held (``mode="hold"``: bit-identical to its value before each step) or zero
    (``mode="zero"``: set to 0 now and after every step). Parameters without a mask are left alone.

    Args:
        model: the module whose parameters are masked.
        masks: ``{qualified name or the parameter itself: bool tensor of the parameter's shape}``.
            Masks are copied onto their parameter's device.
        grad_scale: multiplies the gradients of masked parameters before each step (the kept
            entries; masked ones are zero): one float > 0 for all, or ``{name: float}``. Child-Tuning-F
            uses ``1 / p`` for a Bernoulli(p) mask (Xu et al., 2021). None: no scaling.
        mode: ``"hold"`` or ``"zero"`` (see above).

    Raises:
        ValueError: no masks; a name that is no parameter of ``model`` (the message lists close
            names); a tensor key that is not a parameter of ``model``; one parameter given twice; a
            mask whose shape differs from its parameter's; a ``grad_scale`` not finite and > 0, or
            naming a parameter without a mask; an unknown ``mode``.
        TypeError: a mask that is not a bool tensor.

    Use ``attach(optimizer)`` after building the optimizer. With a closure
    (``optimizer.step(closure)``) the gradients the closure computes inside the step are not
    masked or scaled, but masked entries are still written back after it.
    """

    def __init__(self, model: nn.Module, masks: Mapping, *, grad_scale: float | Mapping[str, float] | None = None,
                 mode: str = "hold"):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.model = model
        self.mode = mode
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._masks: dict[str, Tensor] = {}
        self._held: dict[str, Tensor] = {}  # ~mask: the entries the step may not change
        self._scale_spec: float | Mapping[str, float] | None = None
        self._grad_scale: dict[str, float] = {}
        self._handles: list[tuple] = []  # (optimizer's pre-step handle, post-step handle)
        self._snapshots: dict[str, Tensor] = {}
        self.set_masks(masks, grad_scale=grad_scale)

    # -- masks -------------------------------------------------------------------------------
    def set_masks(self, masks: Mapping, grad_scale: float | Mapping[str, float] | None = None) -> None:
        """Replace every mask (between optimizer steps: Child-Tuning-F draws new ones each step).

        ``grad_scale=None`` keeps the current scaling; pass ``1.0`` to stop scaling. In
        ``mode="zero"`` newly masked entries are zeroed at once. Errors as in the constructor; on
        an error nothing changes.
        """
        checked = self._checked(masks)
        spec = self._scale_spec if grad_scale is None else grad_scale
        scale = self._checked_scale(spec, checked)
        self._masks, self._held, self._snapshots = checked, {name: ~mask for name, mask in checked.items()}, {}
        self._scale_spec, self._grad_scale = spec, scale
        if self.mode == "zero":
            self.apply_to_weights()

    def masks(self) -> dict[str, Tensor]:
        """``{name: bool mask}`` (the tensors held: do not change them in place; use :meth:`set_masks`)."""
        return dict(self._masks)

    def apply_to_weights(self) -> None:
        """Zero every masked entry of the weights now (``mode="zero"`` does this after each step)."""
        with torch.no_grad():
            for name in self._masks:
                self._params[name].masked_fill_(self._held_on(name), 0)

    def density(self, name: str | None = None) -> float:
        """Fraction of masked parameters' entries that may change, in [0, 1] (one parameter's when
        ``name`` is given). Parameters without a mask are not counted."""
        if name is not None:
            if name not in self._masks:
                raise ValueError(f"no mask for {name!r}; masked: {sorted(self._masks)}")
            masks = [self._masks[name]]
        else:
            masks = list(self._masks.values())
        total = sum(mask.numel() for mask in masks)
        return sum(int(mask.sum()) for mask in masks) / total if total else 1.0

    def _checked(self, masks: Mapping) -> dict[str, Tensor]:
        if not isinstance(masks, Mapping) or not masks:
            raise ValueError("masks must be a non-empty mapping {parameter name: bool tensor of its shape}")
        by_id = {id(param): name for name, param in self._params.items()}
        checked: dict[str, Tensor] = {}
        for key, mask in masks.items():
            name = self._name_of(key, by_id)
            if name in checked:
                raise ValueError(f"two masks for {name!r} (given by name and by the parameter itself)")
            checked[name] = self._checked_mask(name, mask)
        return checked

    def _name_of(self, key, by_id: dict[int, str]) -> str:
        owner = type(self.model).__name__
        if isinstance(key, Tensor):
            if id(key) not in by_id:
                raise ValueError(f"a tensor of shape {tuple(key.shape)} given as a mask key is not a parameter of "
                                 f"{owner} (a parameter of another model, or a copy?); key masks by names from "
                                 "model.named_parameters()")
            return by_id[id(key)]
        if not isinstance(key, str):
            raise ValueError(f"mask key {key!r} is neither a parameter name nor a parameter")
        if key not in self._params:
            raise ValueError(f"{key!r} names no parameter of {owner}; {describe_names(self._params, near=key)}")
        return key

    def _checked_mask(self, name: str, mask) -> Tensor:
        param = self._params[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask for {name!r} is {got}; expected a torch.bool tensor (True = may change)")
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}; expected the parameter's shape "
                             f"{tuple(param.shape)}")
        return mask.detach().to(param.device, copy=True)

    def _checked_scale(self, grad_scale, masks: dict[str, Tensor]) -> dict[str, float]:
        if grad_scale is None:
            return {}
        if isinstance(grad_scale, Mapping):
            by_id = {id(param): name for name, param in self._params.items()}
            scale = {self._name_of(key, by_id): value for key, value in grad_scale.items()}
            unmasked = sorted(set(scale) - set(masks))
            if unmasked:
                raise ValueError(f"grad_scale names {unmasked[0]!r}, which has no mask; masked: {sorted(masks)}")
        else:
            scale = dict.fromkeys(masks, grad_scale)
        for name, value in scale.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"grad_scale for {name!r} is {value!r}; expected a finite number > 0")
        return {name: float(value) for name, value in scale.items() if value != 1.0}

    # -- the optimizer -----------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> ParameterMasks:
        """Enforce the masks at every ``optimizer.step()`` from now on; returns ``self``.

        Raises:
            ValueError: ``optimizer`` holds none of the masked parameters (built over another
                model, or over a copy), or this object is already attached to it.
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(self._params[name]) in held for name in self._masks):
            raise ValueError(f"{type(optimizer).__name__} holds none of the masked parameters of "
                             f"{type(self.model).__name__} (masked: {sorted(self._masks)[:3]}, ...); was it built "
                             "over another model or a copy?")
        if any(self._is_attached(optimizer, pre) for pre, _ in self._handles):
            raise ValueError(f"these masks are already attached to this {type(optimizer).__name__}")
        pre = optimizer.register_step_pre_hook(self._before_step)
        post = optimizer.register_step_post_hook(self._after_step)
        self._handles.append((pre, post))
        return self

    def remove(self) -> None:
        """Detach from every optimizer: later steps behave as without masks. The weights and the
        masks are left as they are."""
        for pre, post in self._handles:
            pre.remove()
            post.remove()
        self._handles, self._snapshots = [], {}

    def _is_attached(self, optimizer, handle) -> bool:
        hooks = optimizer._optimizer_step_pre_hooks  # torch keeps no public view of an optimizer's hooks
        return hooks.get(handle.id) == self._before_step

    def _in(self, optimizer) -> list[str]:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [name for name in self._masks if id(self._params[name]) in held]

    def _held_on(self, name: str) -> Tensor:
        """``~mask`` on the parameter's device now (the model may have moved since)."""
        held, param = self._held[name], self._params[name]
        if held.device != param.device:
            self._masks[name] = self._masks[name].to(param.device)
            held = self._held[name] = held.to(param.device)
        return held

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        for name in self._in(optimizer):
            param, held = self._params[name], self._held_on(name)
            grad = param.grad
            if grad is not None:
                if grad.is_sparse:
                    raise TypeError(f"{name!r} has a sparse gradient; ParameterMasks needs dense gradients")
                grad.masked_fill_(held, 0)
                if name in self._grad_scale:
                    grad.mul_(self._grad_scale[name])
            if self.mode == "hold":
                self._snapshots[name] = param.masked_select(held)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for name in self._in(optimizer):
            param, held = self._params[name], self._held_on(name)
            if self.mode == "zero":
                param.masked_fill_(held, 0)
            elif name in self._snapshots:
                param.masked_scatter_(held, self._snapshots.pop(name))

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``{name: bool mask}`` (copies; flat, so safetensors can store it). ``grad_scale`` and
        ``mode`` are configuration: pass them to the constructor again."""
        return {name: mask.clone() for name, mask in self._masks.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the masks with a :meth:`state_dict`'s (checked as in the constructor)."""
        self.set_masks(state)

    def __deepcopy__(self, memo):
        """A copy over ``deepcopy(model)`` (the same copy when both are in one deepcopy call),
        with equal masks, attached to no optimizer: attach it to the copy's own optimizer."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, [] if key == "_handles" else {} if key == "_snapshots" else copy.deepcopy(value, memo))
        return new

    def __repr__(self) -> str:
        return (f"ParameterMasks({len(self._masks)} masked parameters of {type(self.model).__name__}, "
                f"density={self.density():.4f}, mode={self.mode!r}, attached to {len(self._handles)} optimizers)")
