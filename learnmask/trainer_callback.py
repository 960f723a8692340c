"""Gates and a controller inside a Hugging Face ``Trainer``, with one callback.

::

    handle = lm.apply_masks(model, heads=True)
    controller = lm.LagrangianController(lm.LinearWarmup(0.5, warmup_steps=100))
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[lm.GateCallback(handle, controller, gate_lr=0.1)])
    trainer.train()

What the callback does, at each point of the ``Trainer``'s loop:

- ``on_init_end`` (pass it in ``Trainer(callbacks=[...])``): hides the gate logits from the
  optimizer the Trainer is about to build (``requires_grad`` off until training starts): they get
  an optimizer of their own, AdamW with learning rate ``gate_lr``, constant, and no weight decay
  (case G1: weight decay would pull ``log_alpha`` to 0, a half-open gate). Keeping them out of
  the Trainer's optimizer keeps its checkpoints loadable on resume.
- ``on_train_begin``: puts a forward hook on the model that adds ``controller.penalty(s)`` to
  the loss the model returns in training (the Trainer differentiates that loss, so the
  penalty's gradient reaches the gates; with gradient accumulation each micro-batch carries it
  and the Trainer averages); on a resumed run restores the gate optimizer and the controller.
- ``on_optimizer_step`` (right after the Trainer's optimizer step, on the same gradients, after
  its gradient clipping): steps the gate optimizer (under ``torch.distributed``, on gate
  gradients averaged over the ranks first).
- ``on_step_begin`` / ``on_step_end``: the gates' samples of the step come from a generator seeded
  by ``args.seed`` and the step (:func:`learnmask.sampling.open_step`; the rank folded into token
  gates' per-example noise), so every DDP rank draws the same head/FFN/hidden/block samples
  whatever its dropout consumed; ``on_step_end`` also calls ``controller.step()``, once per
  optimizer step (on the sparsity averaged over ranks).
- ``on_log``: adds the expected sparsity and the controller's numbers to the logs and to
  ``state.log_history`` (reporting callbacks the Trainer runs before this one, TensorBoard
  included, do not see them: log them from ``handle``/``controller`` where that matters).
- ``on_save``: writes the gate optimizer's and the controller's state next to the checkpoint
  (``learnmask_gates_optimizer.pt``, ``learnmask_controller.json``; the gates are model
  parameters, saved with the model).
- ``on_train_end``: takes the loss hook off.

Limitations: fp16 mixed precision (a gradient scaler scales the gate gradients too, and only the
Trainer's optimizer is unscaled) is refused; use bf16 or fp32.
"""
from __future__ import annotations

import json
import math
import pathlib

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from learnmask import sampling
from learnmask.io import atomic_torch_save, atomic_write_text, load_torch_file

CONTROLLER_FILE = "learnmask_controller.json"
OPTIMIZER_FILE = "learnmask_gates_optimizer.pt"


class GateCallback(TrainerCallback):
    """A Hugging Face ``TrainerCallback`` that trains a handle's gates under a controller.

    Args:
        handle: the :class:`~learnmask.inject.MaskHandle` of the model the Trainer trains.
        controller: a penalty controller (``LagrangianController``, ``PIController``,
            ``FixedPenalty``; anything with ``penalty(s)``, ``step()``, ``last_metrics()``,
            ``state_dict()``, ``load_state_dict()``), or None to train the gates on the task
            loss alone.
        sparsity: what the controller drives: a gated granularity (``"heads"``, ``"ffn"``, ...;
            the expected fraction of its units closed) or ``"parameters"`` (the expected
            fraction of the prunable parameters removed) or ``"tokens"`` (the expected fraction
            of real tokens closed, see ``MaskHandle.expected_keep_ratio``). Default: ``"heads"``
            if gated, ``"tokens"`` if only tokens are, else ``"parameters"``.
        gate_lr: learning rate of the gate logits, > 0 (constant; no weight decay).

    Raises:
        ValueError: ``sparsity`` names nothing gated, or ``gate_lr`` is not a positive number.
    """

    def __init__(self, handle, controller=None, *, sparsity: str | None = None, gate_lr: float = 0.1) -> None:
        gated = list(handle.gated_names)
        sparsity = sparsity or ("heads" if "heads" in gated else "tokens" if gated == ["tokens"] else "parameters")
        if sparsity != "parameters" and sparsity not in gated:
            raise ValueError(f"sparsity={sparsity!r} is not gated; choose 'parameters' or one of {gated}")
        if isinstance(gate_lr, bool) or not isinstance(gate_lr, (int, float)) or not gate_lr > 0 \
                or not math.isfinite(gate_lr):
            raise ValueError(f"gate_lr must be a positive finite number; got {gate_lr!r}")
        self.handle, self.controller, self.sparsity = handle, controller, sparsity
        self.gates = list(handle.gate_parameters())
        self.optimizer = torch.optim.AdamW(self.gates, lr=float(gate_lr), weight_decay=0.0)
        self._hook = None

    def expected_sparsity(self) -> Tensor:
        """``()`` the quantity the controller drives (see ``sparsity``), differentiable."""
        if self.sparsity == "parameters":
            return self.handle.expected_parameter_sparsity()
        return self.handle.expected_unit_sparsity(self.sparsity)

    # -- Trainer events --------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        if args.fp16:
            raise ValueError("GateCallback does not support fp16 mixed precision (its gradient scaler would leave the "
                             "gate gradients scaled); use bf16=True or fp32")
        for p in self.gates:
            p.requires_grad_(False)  # back on in on_train_begin, after the Trainer built its optimizer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for p in self.gates:
            p.requires_grad_(True)
        own = {id(p) for p in self.gates}
        if optimizer is not None and any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the Trainer's optimizer holds the gate logits: pass GateCallback in "
                             "Trainer(callbacks=[...]) (not add_callback after it is built), and build any optimizer "
                             "of your own without handle.gate_parameters(); GateCallback steps them itself")
        if self._hook is None:
            self._hook = self.handle.model.register_forward_hook(self._add_penalty)
        folder = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and (folder / OPTIMIZER_FILE).is_file():
            self.optimizer.load_state_dict(load_torch_file(folder / OPTIMIZER_FILE, what="gate optimizer state"))
        if self.controller is not None and state.global_step > 0 and (folder / CONTROLLER_FILE).is_file():
            self.controller.load_state_dict(_read_state(folder / CONTROLLER_FILE))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in self.gates:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= torch.distributed.get_world_size()
        self.optimizer.step()

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_sampling()
        self._sampling = sampling.open_step(args.seed, state.global_step, args.process_index)

    def on_step_end(self, args, state, control, **kwargs):
        self._close_sampling()
        if self.controller is not None:
            self.controller.step()

    def _close_sampling(self) -> None:
        if getattr(self, "_sampling", None) is not None:
            sampling.close_step(self._sampling)
            self._sampling = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        ours = {"learnmask/expected_sparsity": float(self.expected_sparsity().detach())}
        if self.controller is not None:
            for name, value in self.controller.last_metrics().items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    ours[f"learnmask/{name}"] = float(value)
        logs.update(ours)
        # the Trainer appended a copy of ``logs`` to its history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(ours)

    def on_save(self, args, state, control, **kwargs):
        folder = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        atomic_torch_save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        if self.controller is not None:
            atomic_write_text(folder / CONTROLLER_FILE, json.dumps(self.controller.state_dict()))

    def on_train_end(self, args, state, control, **kwargs):
        self._close_sampling()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- the loss hook ---------------------------------------------------------------------

    def _add_penalty(self, module: nn.Module, args, output):
        if self.controller is None or not module.training or not torch.is_grad_enabled():
            return output
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:  # no labels: the Trainer computes no loss from this output either
            return output
        output["loss"] = loss + self.controller.penalty(self.expected_sparsity())
        return output


def _read_state(path: pathlib.Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a learnmask controller state ({error}); delete it to restart the "
                         "controller from its initial state") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, not a controller state (a JSON object)")
    return state
