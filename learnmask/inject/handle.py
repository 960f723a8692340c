"""The :class:`MaskHandle` that :func:`~learnmask.inject.apply_masks` returns: one object per gated
model, whatever it gates (heads, FFN units, hidden dimensions, whole blocks, tokens, parameters),
with its gate values, sizes, routes and the way back (``remove``). The parameter masks' part is
:class:`~learnmask.inject.param_families.ParameterFamilies`.

Legend: ``L`` layers, ``H`` heads per layer, ``I`` FFN units per layer, ``d`` hidden size.
Gate shapes: heads ``(L, H)``, ffn ``(L, I)``, hidden ``(d,)``, attention_blocks and
ffn_blocks ``(L,)``.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from learnmask.gates import Gate
from learnmask.inject import hf_attention as hf
from learnmask.inject import hooks as H
from learnmask.inject import token_hooks as TH
from learnmask.inject.architectures import LayerSpec
from learnmask.inject.config import MaskConfig
from learnmask.inject.costs import expected_layer_parameters, layer_costs
from learnmask.inject.hidden import HiddenStream
from learnmask.inject.layout import bias_of
from learnmask.inject.param_families import ParameterFamilies
from learnmask.inject.tokens import TokenGates, TokenState

#: The attribute under which a model carries its gates (an ``nn.ModuleDict``).
GATES_ATTRIBUTE = "learnmask_gates"
#: The attribute under which a model carries its token gates (a :class:`TokenGates`).
TOKENS_ATTRIBUTE = "learnmask_tokens"
#: How the eval pass of a token-gated model applies its decisions (``handle.token_inference``).
TOKEN_INFERENCE = ("drop", "mask")


class _NoNestedTensor:
    """Turns off an ``nn.TransformerEncoder``'s nested-tensor fast path (its default for padded
    batches in inference) while gates are attached; ``remove()`` turns it back on, like a hook."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        encoder.use_nested_tensor = False

    def remove(self) -> None:
        self.encoder.use_nested_tensor = True


class MaskHandle(ParameterFamilies):
    """Gates and parameter masks attached to a model by :func:`apply_masks`.

    Attributes:
        model: the gated model.
        layers: the :class:`LayerSpec` of every gated layer, in model order.
        attention_paths: layer name -> :class:`~learnmask.inject.hf_attention.AttentionPath`:
            ``"op"`` (attends through :func:`learnmask.ops.masked_attention`, head gates fused)
            or ``"hooks"`` with the reason, for every layer with an attention block.
        backend: the op's backend for routed blocks (``"auto"``, a registered name or a backend
            object); may be changed at any time.
        gates: ``nn.ModuleDict`` granularity name -> :class:`Gate`; registered on the model as
            ``learnmask_gates`` (unless the model is an ``nn.Sequential``), so the gates move,
            save and load with it.
        hidden_stream: where the hidden dimensions live outside the layers (hidden gating only).
        z: gate values of the last forward pass, name -> tensor of the gate's shape; with
            ``capture_grad = True`` each is a leaf whose ``.grad`` after backward is ∂loss/∂z.
        tokens: the :class:`~learnmask.inject.tokens.TokenGates` (scorers of the pruning
            layers) with ``tokens=True``, else None; registered on the model as
            ``learnmask_tokens``.
        token_state: the :class:`~learnmask.inject.tokens.TokenState` of the last forward pass.
        token_inference: how eval applies the token decisions: ``"drop"`` (default: the kept
            tokens are gathered and the later layers run on the shorter sequence) or ``"mask"``
            (the same hard decisions as the op's ``token_gate``, tokens left in place).
        frozen, weight_masks, diff_masks, update_masks: the parameter masks (each None when
            off), see :class:`~learnmask.inject.param_families.ParameterFamilies`:
            :meth:`mask_updates`, :meth:`attach_optimizer`, :meth:`export_weights`,
            :meth:`mask_parameters`. With parameter masks only there are no layers and no
            gates: the unit-gate sizes (:meth:`expected_parameter_sparsity`) raise, and
            :meth:`detach`/:meth:`attach` have no hooks to move (parameter masks stay until
            :meth:`remove`).
    """

    def __init__(self, model: nn.Module, layers: list[LayerSpec], gates: dict[str, Gate],
                 config: MaskConfig, hidden_stream: HiddenStream | None, register: bool,
                 tokens: TokenGates | None = None) -> None:
        self.model, self.layers, self.config, self.hidden_stream = model, layers, config, hidden_stream
        self.gates = nn.ModuleDict(gates)
        self.tokens, self.token_state, self._token_inference = tokens, TokenState(), "drop"
        self.z: dict[str, Tensor] = {}
        self.capture_grad = False
        self.registered = register
        self.attention_paths = hf.attention_paths(model, layers, config.attention)
        self._backend = hf.check_backend(config.backend)
        self._costs = [layer_costs(layer) for layer in layers]
        self._hooks: list[Any] = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        self._init_families()
        if tokens is not None:
            TH.check_token_layers(model, layers, tokens, self.attention_paths)
        if register:
            setattr(model, GATES_ATTRIBUTE, self.gates)
            if tokens is not None:
                setattr(model, TOKENS_ATTRIBUTE, tokens)
        self._attach()

    def __deepcopy__(self, memo: dict) -> MaskHandle:
        """A copy (with its model, when copied as part of it) without the last pass's gate values,
        which are not graph leaves after a training forward and cannot be deep-copied."""
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for key, value in self.__dict__.items():
            if key in ("z", "token_state"):  # the last pass's values: not graph leaves
                twin.__dict__[key] = {} if key == "z" else TokenState()
            elif key == "_optimizers":  # the copy's parameters are in none of them
                twin.__dict__[key] = []
            else:
                twin.__dict__[key] = copy.deepcopy(value, memo)
        return twin

    # -- attaching -------------------------------------------------------------------------

    def _attach(self) -> None:
        if not self.gates and self.tokens is None:  # parameter masks only: nothing to hook
            return
        on = set(self.gates)
        self._hooks.append(self.model.register_forward_pre_hook(H.SampleGates(self, "")))
        for module in self.model.modules():  # nested tensors cannot pass the gates' hooks
            if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
                self._hooks.append(_NoNestedTensor(module))
        routes = {}
        for row, layer in enumerate(self.layers):
            att, ffn = layer.attention, layer.ffn
            routed = att is not None and self.attention_paths[layer.name].path == "op"
            if routed:
                routes[hf.attention_module(layer)] = hf.Route(self, row)
            if att is not None and att.functional_out and on & {"heads", "attention_blocks"}:
                weight = H.OutProjParametrization(self, row, att.head_dim, "heads" in on, "attention_blocks" in on)
                self._parametrize(att.out, "weight", weight)
                if "attention_blocks" in on and bias_of(att.out) is not None:
                    self._parametrize(att.out, "bias", H.BiasParametrization(self, row))
            elif att is not None:
                if "heads" in on and not routed:  # routed: the op applies them as head_gate
                    self._pre(att.out, H.ScaleInputUnits(self, "heads", row, att.head_dim))
                if "attention_blocks" in on:
                    self._hooks.append(att.out.register_forward_hook(H.ScaleOutput(self, "attention_blocks", row)))
            if ffn is not None and "ffn" in on:
                self._pre(ffn.down, H.ScaleInputUnits(self, "ffn", row, 1))
            if ffn is not None and "ffn_blocks" in on:
                self._hooks.append(ffn.down.register_forward_hook(H.ScaleOutput(self, "ffn_blocks", row)))
        if "hidden" in on:
            for norm in self.hidden_stream.norms:
                self._hooks.append(norm.register_forward_hook(H.NormOverKept(self, "hidden")))
        if self.tokens is not None:
            self._hooks.extend(TH.attach(self))
        if routes:
            self._hooks.append(hf.Switch(routes, hf.configs_of(self.model, list(routes))))

    def _pre(self, module: nn.Module, hook: H.LearnmaskHook) -> None:
        self._hooks.append(module.register_forward_pre_hook(hook))

    def _parametrize(self, module: nn.Module, name: str, parametrization: nn.Module) -> None:
        H.parametrize_tensor(module, name, parametrization)
        self._parametrized.append((module, name))

    # -- gate values -----------------------------------------------------------------------

    def sample(self) -> None:
        """Draw every gate once (training: a sample; eval: the deterministic mask)."""
        for name, gate in self.gates.items():
            z = gate()
            if self.capture_grad:
                z = z.detach().requires_grad_(True)
            self.z[name] = z

    def reset_tokens(self) -> None:
        """Forget the token decisions of the last pass (at the start of each forward)."""
        self.token_state = TokenState()

    def current(self, name: str) -> Tensor:
        """Gate values of ``name`` for the current pass (sampled now if none yet)."""
        if name not in self.z:
            self.sample()
        return self.z[name]

    def eval_masks(self) -> dict[str, Tensor]:
        """Deterministic masks (each gate's eval rule, or exactly ``eval_k`` units), detached."""
        return {name: gate.deterministic_mask(gate.eval_k).detach() for name, gate in self.gates.items()}

    def set_gate(self, name: str, gate: Gate) -> None:
        """Swap the gate of granularity ``name`` for another of the same shape (say, a FixedGate).

        Raises:
            ValueError: unknown name, or a shape that differs.
        """
        if name not in self.gates:
            raise ValueError(f"no {name!r} gate on this model; gated: {', '.join(self.gates)}")
        old = self.gates[name]
        if tuple(gate.log_alpha.shape) != tuple(old.log_alpha.shape):
            raise ValueError(f"new {name} gate has shape {tuple(gate.log_alpha.shape)}; "
                             f"expected {tuple(old.log_alpha.shape)}")
        gate.to(old.log_alpha.device).train(old.training)
        self.gates[name] = gate
        self.z.pop(name, None)

    def _gate_modules(self) -> list[nn.Module]:
        return [self.gates] + ([self.tokens] if self.tokens is not None else [])

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable gate parameters, to train without weight decay: ``log_alpha`` of each
        learnable gate; the token scorers' weights with ``tokens``; the weight masks' ``scores``
        and the diff masks' ``log_alpha`` (as :func:`learnmask.gates.param_groups` groups them)."""
        own = [p for m in self._gate_modules() for p in m.parameters() if p.requires_grad]
        return iter(own + [p for p in self._mask_gate_parameters() if p.requires_grad])

    def _gate_owned(self) -> set[int]:
        return {id(p) for m in self._gate_modules() for p in m.parameters()} | self._mask_gate_owned()

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the model that are not gate parameters (see :meth:`gate_parameters`):
        its own (frozen ones included) and the diff masks' ``delta``."""
        own = self._gate_owned()
        return (p for p in self.model.parameters() if id(p) not in own)

    @property
    def token_inference(self) -> str:
        """``"drop"`` or ``"mask"``: how eval applies the token decisions (see the class)."""
        return self._token_inference

    @token_inference.setter
    def token_inference(self, mode: str) -> None:
        if mode not in TOKEN_INFERENCE:
            raise ValueError(f"token_inference must be one of {list(TOKEN_INFERENCE)}; got {mode!r}")
        self._token_inference = mode

    def token_masks(self) -> list[Tensor]:
        """Per pruning layer, ``(B, S0)`` bool tokens of the last forward's input kept after it
        (S0: the input's length; training: keep value > 0)."""
        return list(self.token_state.kept)

    # -- sizes -----------------------------------------------------------------------------

    def _prunable(self, probs: Mapping[str, Tensor] | None) -> Tensor:
        """Parameters of the prunable part given keep probabilities (None: all kept); 0 without
        layers (parameter masks only)."""
        if not self.layers:
            return torch.zeros(())
        probs = probs or {}
        d = probs["hidden"].sum() if "hidden" in probs else float(self.layers[0].hidden_size)
        total = torch.zeros(())
        for row, costs in enumerate(self._costs):
            layer_probs = {name: value[row] for name, value in probs.items() if name != "hidden"}
            total = total + expected_layer_parameters(costs, d, layer_probs)
        if self.hidden_stream is not None:
            total = total + self.hidden_stream.cost.at(d)
        return total

    def _keep_probabilities(self) -> dict[str, Tensor]:
        return {name: gate.keep_probabilities() for name, gate in self.gates.items()}

    def dense_parameters(self) -> int:
        """Parameters of the model without its gates and parameter masks (what it has before
        pruning)."""
        own = self._gate_owned() | self._mask_owned()
        return sum(p.numel() for p in self.model.parameters() if id(p) not in own)

    def prunable_parameters(self) -> int:
        """Parameters whose count depends on a gate: every gated layer (all of its attention,
        FFN and norms, and the biases its emptied blocks' stubs add) and, with hidden gating, the
        embeddings, final norms and heads reading d."""
        return round(float(self._prunable(None)))

    def expected_remaining_parameters(self) -> Tensor:
        """``()`` expected parameters left after pruning, differentiable in the gate logits."""
        return self.dense_parameters() - self.prunable_parameters() + self._prunable(self._keep_probabilities())

    def expected_parameter_sparsity(self) -> Tensor:
        """``()`` expected fraction of the prunable parameters removed, in [0, 1], differentiable
        in the gate logits (see :meth:`prunable_parameters` for what is prunable).

        Raises:
            ValueError: no unit gates (nothing prunable: parameter masks or tokens only).
        """
        if not self.gates:
            raise ValueError(f"expected_parameter_sparsity measures unit gates, and this handle has none (on: "
                             f"{', '.join(self.gated_names + self.parameter_families) or 'nothing'}); for diff masks "
                             "use handle.diff_masks.expected_density(), for weight masks "
                             "handle.weight_masks.density()")
        return 1.0 - self._prunable(self._keep_probabilities()) / self.prunable_parameters()

    def expected_unit_sparsity(self, name: str = "heads") -> Tensor:
        """``()`` expected fraction of the units of granularity ``name`` closed (heads, FFN units,
        hidden dims or blocks), in [0, 1], differentiable: ``1 - mean P(z > 0)``.

        Raises:
            ValueError: ``name`` is not gated.
        """
        if name == "tokens" and self.tokens is not None:
            return 1.0 - self.token_state.expected_keep_ratio()
        if name not in self.gates:
            raise ValueError(f"no {name!r} gate on this model; gated: {', '.join(self.gated_names)}")
        return 1.0 - self.gates[name].keep_ratio()

    def expected_keep_ratio(self, name: str = "heads") -> Tensor:
        """``()`` ``1 - expected_unit_sparsity(name)``: the expected fraction of units kept, in
        [0, 1], differentiable. For ``"tokens"``: of the last forward pass, the mean over its
        pruning layers and examples of the expected fraction of real tokens kept (CLS counted
        kept, padding never); a controller drives it to ``handle.tokens.target_keep_ratio``.

        Raises:
            ValueError: ``name`` is not gated; for tokens, no forward pass yet.
        """
        return 1.0 - self.expected_unit_sparsity(name)

    @property
    def gated_names(self) -> tuple[str, ...]:
        """Every granularity gated: the unit gates' names, then ``"tokens"`` with token gates."""
        return (*self.gates, *(("tokens",) if self.tokens is not None else ()))

    @property
    def backend(self):
        """The op's backend for routed blocks: ``"auto"``, a registered backend name or an
        ``AttentionBackend`` object (say, ``TritonBackend(cpu_interpreter=True)`` in tests)."""
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        self._backend = hf.check_backend(backend)

    def remaining_parameters(self) -> int:
        """Parameters ``finalize`` keeps under the eval masks: :meth:`parameters_for` them, plus
        the one zeroed head (and zeroed output bias) finalize leaves in a ``target_modules``
        attention with every head closed. Grouped-query padding (Llama) is not counted."""
        masks = self.eval_masks()
        extra = 0.0
        for row, (layer, costs) in enumerate(zip(self.layers, self._costs)):
            if layer.arch != "custom" or layer.attention is None:
                continue
            heads_open = bool((masks["heads"][row] > 0).any()) if "heads" in masks else True
            block_open = bool(masks["attention_blocks"][row] > 0) if "attention_blocks" in masks else True
            if not (heads_open and block_open):
                d = layer.hidden_size
                extra += costs.head.at(d) + (0.0 if block_open else costs.attention.at(d))
        return self.parameters_for(masks) + round(extra)

    def parameters_for(self, masks: Mapping[str, Tensor]) -> int:
        """Parameters left if the units where ``masks[name] == 0`` were removed.

        Args:
            masks: granularity name -> tensor of that gate's shape (> 0: kept); a gated
                granularity left out counts as all kept.
        """
        probs = {name: (torch.as_tensor(mask) > 0).float() for name, mask in masks.items()}
        unknown = sorted(set(probs) - set(self.gates))
        if unknown:
            raise ValueError(f"masks given for {unknown}; gated: {', '.join(self.gates)}")
        return round(self.dense_parameters() - self.prunable_parameters() + float(self._prunable(probs)))

    def keep_per_layer(self, name: str = "heads") -> list[float]:
        """Fraction of units each layer keeps under the eval mask of ``name``, in [0, 1].

        Raises:
            ValueError: ``name`` is not a unit gate of this handle.
        """
        if name not in self.gates:
            raise ValueError(f"no {name!r} gate on this model; unit gates: {', '.join(self.gates) or 'none'}")
        mask = self.eval_masks()[name] > 0
        return mask.float().reshape(len(self.layers), -1).mean(dim=1).tolist()

    # -- removal ---------------------------------------------------------------------------

    def detach(self) -> None:
        """Take the hooks and parametrizations off (the gates stay); :meth:`attach` puts them back.

        While detached the model computes as if ungated (bit-identical to the original).
        """
        from torch.nn.utils import parametrize

        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, name in self._parametrized:
            if parametrize.is_parametrized(module, name):
                # a deep copy shares the parametrized class; give this module its own first, so
                # that un-parametrizing one of them leaves the other intact
                cls = type(module)
                own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
                module.__class__ = type(cls.__name__, cls.__bases__, own)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self._parametrized.clear()
        self.z.clear()

    def attach(self) -> None:
        """Put the hooks and parametrizations back after :meth:`detach` (no-op if attached)."""
        if not self._hooks:
            self._attach()

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Inside the block the model computes as if ungated (see :meth:`detach`); after it the
        hooks and parametrizations are back."""
        self.detach()
        try:
            yield
        finally:
            self.attach()

    def finalize(self, *, inplace: bool = False) -> nn.Module:
        """The pruned plain model: :func:`learnmask.export.finalize` of this handle."""
        from learnmask.export import finalize

        return finalize(self, inplace=inplace)

    def export_token_pruning(self, *, inplace: bool = False) -> nn.Module:
        """The plain model that drops tokens at inference without learnmask's hooks or attention
        function: :func:`learnmask.export.finalize` of this token-gated handle (heads, FFN units
        and blocks gated with it are pruned too; see
        :class:`learnmask.export.tokens.TokenDroppingLayers`).

        Raises:
            ValueError: this handle gates no tokens (use :meth:`finalize`), or what
                :func:`~learnmask.export.finalize` raises.
        """
        if self.tokens is None:
            raise ValueError(f"no token gates on this model (gated: {', '.join(self.gated_names)}); "
                             "apply_masks with tokens=True, or use finalize()")
        return self.finalize(inplace=inplace)

    def remove(self) -> None:
        """Take every hook, parametrization, route, gate and parameter mask off; the model is then
        bit-identical (its attention implementation switched back; frozen parameters get back
        their ``requires_grad`` and their optimizer groups; update masks leave their optimizers,
        the weights as they are). The parameter masks' trained state is dropped: call
        :meth:`export_weights` first to keep it."""
        self._remove_families()
        self.detach()
        if getattr(self.model, GATES_ATTRIBUTE, None) is self.gates:
            delattr(self.model, GATES_ATTRIBUTE)
        if self.tokens is not None and getattr(self.model, TOKENS_ATTRIBUTE, None) is self.tokens:
            delattr(self.model, TOKENS_ATTRIBUTE)
