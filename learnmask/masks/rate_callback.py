"""A dynamic masking rate inside the Hugging Face ``Trainer``: a ``TrainerCallback`` that sets
an :class:`~learnmask.masks.collate.MLMCollator`'s ``mlm_probability`` from a schedule of the
step (Ankner et al., 2023) or from a loss-adaptive controller.

Needs ``transformers`` (imported when this module is). The collator must run in the training
process: set ``dataloader_num_workers=0`` (worker processes hold copies that no update
reaches; the callback refuses other values).
"""
from __future__ import annotations

import transformers

from learnmask.control.base import RatioController
from learnmask.masks.collate import MLMCollator

__all__ = ["MaskingRateCallback"]


class MaskingRateCallback(transformers.TrainerCallback):
    """Move ``collator.mlm_probability`` while the Trainer runs.

    With ``schedule``: the batches of optimizer step ``t`` (0-based) are masked at
    ``schedule(t)``. The callback hands the schedule to the collator, which counts the
    batches it collates (the loader fetches a batch ahead of the step, so a rate set from the
    step counter would lag by one); on resume the count starts at ``global_step``.
    With ``controller`` (e.g. ``LossAdaptiveController(0.15, r_min=0.15, r_max=0.4,
    harder="up")``): each logged training loss is fed to ``controller.update`` and the new
    ratio becomes the rate of the batches collated next; set ``logging_steps=1`` to update
    it every step.

    Args:
        collator: the Trainer's ``data_collator``.
        schedule: ``schedule(step) -> rate`` in [0, 1]; or
        controller: a :class:`~learnmask.control.RatioController`.

    Raises:
        ValueError: neither or both of ``schedule`` and ``controller``; at train begin,
            ``dataloader_num_workers > 0``.
    """

    def __init__(self, collator: MLMCollator, *, schedule=None, controller: RatioController | None = None):
        if (schedule is None) == (controller is None):
            raise ValueError("MaskingRateCallback needs exactly one of schedule= or controller=")
        self.collator, self.schedule, self.controller = collator, schedule, controller
        if schedule is not None:  # now: the Trainer may collate a first batch before on_train_begin
            collator.rate_schedule, collator.batches_collated = schedule, 0

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_num_workers:
            raise ValueError("a dynamic masking rate needs dataloader_num_workers=0 "
                             f"(got {args.dataloader_num_workers}): "
                             "worker processes collate with their own copy of the collator")
        if self.controller is not None:
            self.collator.mlm_probability = self.controller.ratio
        else:
            self.collator.batches_per_step = args.gradient_accumulation_steps
            if state.global_step:  # resumed from a checkpoint
                self.collator.batches_collated = state.global_step * args.gradient_accumulation_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.controller is not None and logs and "loss" in logs:
            self.collator.mlm_probability = self.controller.update(logs["loss"])
