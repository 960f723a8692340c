"""Head gates on a model as it is: one gate value per head per layer, applied by hooks.

The gate multiplies each head's output just before the attention output projection, whose
input is the concatenation of the heads, ``(B, S, H * D)``. This is exactly the ``head_mask`` of
Michel et al. (2019) and of CoFi pruning (Xia et al., 2022), which transformers 5 no longer
offers, and it works without forking any model class: ``remove()`` takes the hooks off and the
model is bit-identical to what it was.

Legend: ``B`` batch, ``S`` sequence length, ``L`` number of attention blocks (layers),
``H`` heads per block, ``D`` head size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from einops import rearrange
from torch import nn

from learnmask.gates import Gate, make_gate
from learnmask.inject.architectures import is_mha

# Names of the attention output projection inside an attention block, by architecture:
# BERT/RoBERTa/ELECTRA (`output.dense`), Llama/Mistral/ViT in transformers 5 (`o_proj`),
# DistilBERT (`out_lin`), GPT-2 (`c_proj`).
OUTPUT_PROJECTIONS = ("output.dense", "o_proj", "out_lin", "c_proj")


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One attention block found in a model.

    Attributes:
        name: qualified name of the attention module (``encoder.layer.0.attention``).
        out_proj_name: qualified name of its output projection, whose input holds the heads.
        out_proj: that module (``nn.Linear`` or GPT-2's ``Conv1D``).
        num_heads: heads in the block (H).
    """

    name: str
    out_proj_name: str
    out_proj: nn.Module
    num_heads: int


def _num_heads(model: nn.Module, module: nn.Module) -> int | None:
    for attribute in ("num_attention_heads", "num_heads", "n_heads", "n_head"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    config = getattr(model, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) else None


def find_attention_blocks(
    model: nn.Module, *, target_modules: list[str] | None = None, num_heads: int | None = None
) -> list[AttentionBlock]:
    """Attention blocks of a Hugging Face BERT/RoBERTa/DistilBERT/GPT-2/ViT/Llama model.

    A block is a module whose class name ends in ``Attention`` and that owns one of the output
    projections in ``OUTPUT_PROJECTIONS``. For any other model pass ``target_modules``: the
    qualified names of the output projections whose input is the concatenation of the heads,
    with ``num_heads``.

    Raises:
        ValueError: nothing found (the message says what to pass), a target module that does
            not exist, or a head count that is missing or does not divide the projection width.
    """
    modules = dict(model.named_modules())
    blocks = []
    if target_modules:
        if num_heads is None:
            raise ValueError("target_modules given without num_heads; pass num_heads=<heads per block>")
        for name in target_modules:
            if name not in modules:
                raise ValueError(f"target module {name!r} not found in {type(model).__name__}")
            parent = modules.get(name.rpartition(".")[0])
            if is_mha(parent):
                raise ValueError(
                    f"{name!r} is the out_proj of an nn.MultiheadAttention, which uses its weight "
                    "directly (the module is never called), so a hook there would gate nothing; use "
                    "learnmask.inject.apply_masks(model, heads=True), which gates it by a parametrization"
                )
            blocks.append(AttentionBlock(name.rpartition(".")[0], name, modules[name], num_heads))
        return blocks
    for name, module in modules.items():
        if not type(module).__name__.endswith("Attention"):
            continue
        for suffix in OUTPUT_PROJECTIONS:
            full = f"{name}.{suffix}" if name else suffix
            if full in modules:
                heads = num_heads or _num_heads(model, module)
                if heads is None:
                    raise ValueError(f"cannot tell the head count of {name!r}; pass num_heads=...")
                blocks.append(AttentionBlock(name, full, modules[full], heads))
                break
    if not blocks:
        raise ValueError(
            f"no attention blocks found in {type(model).__name__}; pass target_modules=[...] "
            "(names of the attention output projections) and num_heads=..."
        )
    return blocks


class HeadGateHandle:
    """Gates attached to the heads of a model; returned by :func:`apply_head_gates`.

    Attributes:
        gate: the :class:`~learnmask.gates.Gate` of shape ``(L, H)``; registered on the model as
            the submodule ``learnmask_head_gate`` (when ``registered``) so that it moves, saves and
            loads with it.
        blocks: the gated :class:`AttentionBlock` s, in model order.
        z: the gate values of the last forward pass, ``(L, H)`` in [0, 1]; with
            ``capture_grad=True`` a leaf whose ``.grad`` after backward is ∂loss/∂z (head
            importance, Michel et al., 2019).
    """

    def __init__(self, model: nn.Module, gate: Gate, blocks: list[AttentionBlock]):
        self.model, self.gate, self.blocks = model, gate, blocks
        self.z: torch.Tensor | None = None
        self.capture_grad = False
        self.registered = False
        self._hooks = []
        self._attach()

    def _attach(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._sample))
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.out_proj.register_forward_pre_hook(self._make_hook(index, block.num_heads)))

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Inside the block the hooks are off (the model computes as if ungated; the gate stays);
        they are back on after it (used by ``finalize`` to copy the model without them)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        try:
            yield
        finally:
            self._attach()

    def _sample(self, module, args):
        if not self.registered:  # an unregistered gate (nn.Sequential) does not see model.eval()
            self.gate.train(module.training)
        z = self.gate()
        if self.capture_grad:
            z = z.detach().requires_grad_(True)
        self.z = z

    def _make_hook(self, index: int, heads: int):
        def hook(module, args):
            hidden, *rest = args
            if self.z is None:  # a block called on its own, outside the model's forward
                self._sample(module, args)
            z = self.z[index].to(hidden.dtype)
            gated = rearrange(hidden, "... (h d) -> ... h d", h=heads) * rearrange(z, "h -> h 1")
            return (rearrange(gated, "... h d -> ... (h d)"), *rest)

        return hook

    def set_gate(self, gate: Gate) -> None:
        """Swap in another gate of the same shape (say, a :class:`FixedGate` once training ends).

        Raises:
            ValueError: the new gate's shape differs.
        """
        if gate.log_alpha.shape != self.gate.log_alpha.shape:
            raise ValueError(f"new gate has shape {tuple(gate.log_alpha.shape)}; expected {tuple(self.gate.log_alpha.shape)}")
        gate.to(self.gate.log_alpha.device)
        gate.train(self.gate.training)
        self.gate = gate
        if self.registered:
            self.model.learnmask_head_gate = gate

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the gates (``log_alpha``)."""
        return (p for p in self.gate.parameters() if p.requires_grad)

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the model that are not gate parameters."""
        own = {id(p) for p in self.gate.parameters()}
        return (p for p in self.model.parameters() if id(p) not in own)

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of heads closed, a 0-dim tensor in [0, 1], differentiable in ``log_alpha``."""
        return 1.0 - self.gate.keep_ratio()

    def keep_per_layer(self) -> list[float]:
        """Fraction of heads each block keeps under the gate's deterministic (eval) mask, in [0, 1]."""
        mask = self.gate.deterministic_mask(self.gate.eval_k)
        return (mask > 0).float().mean(dim=1).tolist()

    def remove(self) -> None:
        """Take every hook and the gate off the model; it is then bit-identical to the original."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if getattr(self.model, "learnmask_head_gate", None) is self.gate:
            del self.model.learnmask_head_gate


def apply_head_gates(
    model: nn.Module,
    gate: Gate | str = "hard_concrete",
    *,
    target_modules: list[str] | None = None,
    num_heads: int | None = None,
    register: bool | None = None,
    **gate_kwargs,
) -> HeadGateHandle:
    """Attach one gate value per head per attention block of ``model``.

    Args:
        model: a Hugging Face BERT-family/GPT-2/ViT/Llama model, or any model with
            ``target_modules`` given.
        gate: a :class:`Gate` of shape ``(L, H)`` or a registered gate kind name, built with
            ``gate_kwargs`` (``learnmask.gates.available_gates()`` lists the kinds).
        target_modules, num_heads: see :func:`find_attention_blocks`.
        register: register the gate on the model as the submodule ``learnmask_head_gate`` so that
            it moves, saves and loads with the model (default: yes, except for ``nn.Sequential``,
            which would call it as a layer; there the gate lives on the handle only).

    Returns:
        a :class:`HeadGateHandle`; with the gate fully open the model's outputs are unchanged.

    Note:
        A new gate value is drawn (or, in eval mode, the deterministic mask taken) at each
        forward of ``model`` itself. Calling a submodule directly (``model.bert(...)``) reuses
        the last value: call the model you gated.

    Raises:
        ValueError: no attention blocks found, blocks with different head counts, a gate whose
            shape is not ``(L, H)``, or a model that already carries head gates.
    """
    if hasattr(model, "learnmask_head_gate"):
        raise ValueError("model already has head gates; call remove() on the first handle before applying again")
    blocks = find_attention_blocks(model, target_modules=target_modules, num_heads=num_heads)
    counts = sorted({block.num_heads for block in blocks})
    if len(counts) != 1:
        raise ValueError(f"blocks have different head counts {counts}; gate them one block at a time")
    shape = (len(blocks), counts[0])
    if isinstance(gate, str):
        gate = make_gate(gate, shape, **gate_kwargs)
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a learnmask Gate or a registered gate kind name; got {type(gate).__name__}")
    if tuple(gate.log_alpha.shape) != shape:
        raise ValueError(f"gate has shape {tuple(gate.log_alpha.shape)}; expected (layers, heads) = {shape}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        gate.to(parameter.device)
    gate.train(model.training)  # a model in eval mode gets its deterministic gate, not samples
    if register is None:
        register = not isinstance(model, nn.Sequential)
    handle = HeadGateHandle(model, gate, blocks)
    handle.registered = register
    if register:
        model.learnmask_head_gate = gate
    return handle
