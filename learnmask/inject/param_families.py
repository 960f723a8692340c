"""Parameter masks on the one :class:`~learnmask.inject.handle.MaskHandle`: freezing, update-level
masks, piggyback weight masks and diff masks, chosen by :class:`~learnmask.inject.config.MaskConfig`'s
``freeze``, ``weight_masks`` and ``diff_masks`` tables (or, for update masks, by
``handle.mask_updates``), applied, attached to optimizers, exported and removed with the rest.

Sources: freezing and gradual unfreezing (ULMFiT, Howard & Ruder 2018); update masks for
Child-Tuning (Xu et al. 2021) and FISH (Sung et al. 2021); piggyback weight masks (Mallya, Davis &
Lazebnik 2018); diff masks (Guo, Rush & Kim 2021). The machinery is :mod:`learnmask.params`.

Shape legend: ``(*p)`` is the shape of a masked parameter ``p``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from learnmask.inject.param_config import OPTIONS, PARAMETER_FAMILIES, SELECTORS

if TYPE_CHECKING:
    from learnmask.inject.config import MaskConfig
    from learnmask.params import DiffMaskHandle, FrozenParameters, ParameterMasks, WeightMaskHandle


def select_families(model: nn.Module, config: MaskConfig) -> dict[str, dict[str, nn.Parameter]]:
    """family -> ``{qualified name: parameter}`` each family of ``config`` chooses, on ``model`` as
    it is now (before any gate or mask renames or adds parameters).

    Raises:
        ValueError: a selection matching no parameter (as ``select_parameters``, prefixed with the
            family), or a parameter chosen by both ``weight_masks`` and ``diff_masks`` (named).
    """
    from learnmask.params.select import select_parameters

    chosen = {}
    for family in config.parameter_families():
        table = getattr(config, family)
        try:
            chosen[family] = select_parameters(model, **{key: table[key] for key in SELECTORS if key in table})
        except ValueError as err:
            raise ValueError(f"{family}: {err}") from None
    both = [name for name in chosen.get("weight_masks", {}) if name in chosen.get("diff_masks", {})]
    if both:
        more = f" and {len(both) - 3} more" if len(both) > 3 else ""
        raise ValueError(f"weight_masks and diff_masks both choose {', '.join(map(repr, both[:3]))}{more}; a "
                         "parameter takes one learnable mask: narrow one of the two selections")
    return chosen


class ParameterFamilies:
    """The parameter-mask part of :class:`~learnmask.inject.handle.MaskHandle` (a mixin).

    Attributes:
        frozen: the :class:`~learnmask.params.FrozenParameters` of ``config.freeze``, or None.
        weight_masks: the :class:`~learnmask.params.WeightMaskHandle` of ``config.weight_masks``,
            or None.
        diff_masks: the :class:`~learnmask.params.DiffMaskHandle` of ``config.diff_masks``, or None.
        update_masks: the :class:`~learnmask.params.ParameterMasks` of the last
            :meth:`mask_updates`, or None.

    The masks' own parameters go with the gates for the optimizer (as
    :func:`learnmask.gates.param_groups` groups them): :meth:`gate_parameters` holds the
    weight masks' ``scores`` and the diff masks' ``log_alpha`` (train them without weight
    decay), :meth:`base_parameters` the diff masks' ``delta`` with the model's own parameters;
    :meth:`mask_parameters` lists all three kinds.
    """

    model: nn.Module
    frozen: FrozenParameters | None
    weight_masks: WeightMaskHandle | None
    diff_masks: DiffMaskHandle | None
    update_masks: ParameterMasks | None
    gated_names: tuple[str, ...]  # MaskHandle's: the unit and token gates

    def _init_families(self) -> None:
        self.frozen = self.weight_masks = self.diff_masks = self.update_masks = None
        self._optimizers: list[torch.optim.Optimizer] = []

    def _apply_families(self, config: MaskConfig, chosen: Mapping[str, Mapping[str, nn.Parameter]]) -> None:
        """Freeze, then put weight masks, then diff masks on the parameters ``chosen`` (by
        :func:`select_families` before the gates were attached). On an error the caller removes
        the handle: what was applied is recorded on it as it is applied."""
        from learnmask.params import apply_diff_masks, apply_weight_masks, freeze

        if "freeze" in chosen:
            ids = {id(param) for param in chosen["freeze"].values()}
            self.frozen = freeze(self.model, predicate=lambda name, param: id(param) in ids)
        for family, apply in (("weight_masks", apply_weight_masks), ("diff_masks", apply_diff_masks)):
            if family in chosen:
                table = getattr(config, family)
                options = {key: table[key] for key in OPTIONS[family] if key in table}
                setattr(self, family, apply(self.model, list(chosen[family]), **options))

    @property
    def parameter_families(self) -> tuple[str, ...]:
        """The parameter-mask families on this handle: of ``"freeze"``, ``"weight_masks"``,
        ``"diff_masks"``, ``"update_masks"``."""
        names = (*PARAMETER_FAMILIES, "update_masks")
        return tuple(name for name, on in zip(names, (self.frozen, self.weight_masks, self.diff_masks,
                                                      self.update_masks)) if on is not None)

    def _mask_gate_parameters(self) -> list[nn.Parameter]:
        """Weight masks' ``scores`` and diff masks' ``log_alpha`` (while they train)."""
        out = self.weight_masks.mask_parameters() if self.weight_masks is not None else []
        return out + (self.diff_masks.gate_parameters() if self.diff_masks is not None else [])

    def _mask_gate_owned(self) -> set[int]:
        """ids of the weight masks' ``scores`` and the diff masks' ``log_alpha`` (trained or not)."""
        owned = {id(mask.scores) for mask in self.weight_masks.masks().values()} \
            if self.weight_masks is not None else set()
        if self.diff_masks is not None:
            owned |= {id(mask.gate.log_alpha) for mask in self.diff_masks.masks().values()}
        return owned

    def _mask_owned(self) -> set[int]:
        """ids of every parameter the learnable masks own (scores, delta, log_alpha)."""
        owned = {id(p) for handle in (self.weight_masks, self.diff_masks) if handle is not None
                 for mask in handle.masks().values() for p in mask.parameters()}
        return owned

    def mask_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the learnable parameter masks: weight masks' ``scores``, then diff
        masks' ``delta`` and ``log_alpha`` (empty without such masks)."""
        for handle in (self.weight_masks, self.diff_masks):
            if handle is not None:
                yield from (p for p in handle.mask_parameters() if p.requires_grad)

    def mask_updates(self, masks: Mapping, *, grad_scale: float | Mapping[str, float] | None = None,
                     mode: str = "hold") -> ParameterMasks:
        """Hold entries of parameters still at every optimizer step (Child-Tuning, Xu et al. 2021;
        FISH, Sung et al. 2021): a :class:`~learnmask.params.ParameterMasks` over this model,
        replacing the previous one (which leaves its optimizers), attached to every optimizer
        given to :meth:`attach_optimizer` that holds a masked parameter.

        Args:
            masks: ``{qualified name or parameter: (*p) bool tensor}``, True = may change.
            grad_scale: multiplies the kept gradients (one float > 0, or ``{name: float}``;
                Child-Tuning-F uses ``1 / p``); None: no scaling.
            mode: ``"hold"`` (masked entries bit-identical after each step) or ``"zero"``
                (masked entries set to 0 now and after each step).

        Returns:
            The new :class:`~learnmask.params.ParameterMasks` (also ``handle.update_masks``).

        Raises:
            ValueError, TypeError: as :class:`~learnmask.params.ParameterMasks` (a name that is no
                parameter, a mask of another shape than its parameter, a non-bool mask, ...);
                optimizers are attached but none holds a masked parameter. On an error nothing
                changes.
        """
        from learnmask.params import ParameterMasks

        new = ParameterMasks(self.model, masks, grad_scale=grad_scale, mode=mode)
        named = dict(self.model.named_parameters())
        masked = {id(named[name]) for name in new.masks()}
        targets = [opt for opt in self._optimizers
                   if any(id(p) in masked for group in opt.param_groups for p in group["params"])]
        if self._optimizers and not targets:
            raise ValueError(f"none of the {len(self._optimizers)} attached optimizers holds a masked parameter "
                             f"(masked: {sorted(new.masks())[:3]}); build the optimizer over them")
        if self.update_masks is not None:
            self.update_masks.remove()
        self.update_masks = new
        for optimizer in targets:
            new.attach(optimizer)
        return new

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make ``optimizer`` respect the parameter masks: frozen parameters leave its groups (their
        state dropped), :attr:`update_masks` hold at each of its steps, and masks given later by
        :meth:`mask_updates` attach to it too. Returns ``optimizer``.

        (``attach()``/``detach()`` are the gates' hooks; this is the optimizer side.)

        Raises:
            ValueError: ``optimizer`` is attached already, or the update masks' parameters are
                none of its (nothing changes then).
        """
        if any(optimizer is known for known in self._optimizers):
            raise ValueError(f"this {type(optimizer).__name__} is already attached to the handle")
        if self.update_masks is not None:
            self.update_masks.attach(optimizer)
        if self.frozen is not None:
            self.frozen.attach(optimizer)
        self._optimizers.append(optimizer)
        return optimizer

    def export_weights(self) -> dict[str, Tensor]:
        """The trained weights as a plain state dict of the unmodified model (strict load).

        Each parameter under a weight or diff mask becomes the ``(*p)`` weight the masked model
        uses in eval mode (:func:`learnmask.params.export_weights`: the same expression as the
        forward, so the plain model's eval outputs are bit-identical); the masks' own tensors
        are left out; frozen and update-masked parameters are plain already.

        Raises:
            ValueError: the handle also carries unit or token gates (their effect is no weight:
                use :meth:`finalize`, or gate those separately), or another parametrization is
                stacked on a masked parameter.
            RuntimeError: the masks were removed.
        """
        from learnmask.params import export_weights

        if self.gated_names:
            raise ValueError(f"export_weights gives weights for the unmodified model, but this handle also gates "
                             f"{', '.join(self.gated_names)}, which no plain weight can express; finalize() prunes "
                             "unit gates (without parameter masks), or apply the parameter masks on their own")
        parts = [export_weights(handle) for handle in (self.weight_masks, self.diff_masks) if handle is not None]
        if not parts:
            return dict(self.model.state_dict())
        prefixes = tuple(f"{owner}.parametrizations.{attr}." if owner else f"parametrizations.{attr}."
                         for handle in (self.weight_masks, self.diff_masks) if handle is not None
                         for owner, _, attr in (name.rpartition(".") for name in handle.names))
        out: dict[str, Tensor] = {}
        for part in parts:  # each part is plain for its own masks and raw for the other kind's
            for key, value in part.items():
                if not key.startswith(prefixes):
                    out.setdefault(key, value)
        return out

    def _remove_families(self) -> None:
        """Undo the parameter masks in the reverse order of application (update masks, diff masks,
        weight masks, freezing), so each restores what it found."""
        if self.update_masks is not None:
            self.update_masks.remove()
        for family in ("diff_masks", "weight_masks"):
            handle = getattr(self, family)
            if handle is not None:
                handle.remove()
        if self.frozen is not None:
            self.frozen.remove()
        self.frozen = self.weight_masks = self.diff_masks = self.update_masks = None
        self._optimizers = []
