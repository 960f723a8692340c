"""Gate base class, the gate registry, and optimizer parameter groups for gates.

A gate is an ``nn.Module`` that owns one tensor ``log_alpha`` of shape ``shape`` (e.g.
``(n_layers, n_heads)``) and returns a mask ``z`` of the same shape when called with no input.

Shape legend:
    ``*shape``  the gate's shape, any non-empty tuple of positive ints (N = prod(shape)).
    ``()``      a scalar tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from learnmask.functional import topk_mask

__all__ = ["Gate", "register_gate", "make_gate", "available_gates", "param_groups"]

GateT = TypeVar("GateT", bound=type["Gate"])

# The one registry of the library (users extend it with @register_gate).
_GATE_REGISTRY: dict[str, type[Gate]] = {}


def _validate_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of positive ints; raise ValueError naming what came."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) == 0 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise ValueError(
            f"shape must be a non-empty tuple of positive ints, e.g. (12, 12); got {shape!r}"
        )
    return tuple(shape)


def _validate_keep_ratio(init_keep_ratio: float | None) -> float | None:
    """Return ``init_keep_ratio`` as a float in (0, 1] (or None); raise ValueError otherwise."""
    if init_keep_ratio is None:
        return None
    value = float(init_keep_ratio)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"init_keep_ratio must be in (0, 1]; got {init_keep_ratio!r}")
    return value


class Gate(nn.Module):
    """Base class of learnable masks over a fixed set of units (heads, neurons, layers, ...).

    Subclasses implement :meth:`sample` (the training-mode mask), :meth:`_eval_mask` (the
    kind's own evaluation rule) and :meth:`expected_l0`.

    Non-finite logits, one rule for every kind (built-in or registered): a NaN in ``log_alpha``
    is refused with a ``ValueError`` by every method that reads it (``forward``, ``sample``,
    ``deterministic_mask``, ``expected_l0``, ``keep_probabilities``, ``keep_ratio``) — it
    usually means the loss or the optimizer diverged, and a gate value computed from it would
    be NaN or an arbitrary 0/1. ``+inf`` / ``-inf`` are allowed: the unit is surely kept /
    surely removed (z = 1 / z = 0, expected L0 contribution 1 / 0). The subclass methods are
    wrapped at class creation (:meth:`__init_subclass__`), so a new kind follows the rule too.

    ``forward()`` takes no input and returns ``z`` of shape ``(*shape)`` in [0, 1]: a sample
    in training mode; in eval mode ``deterministic_mask(self.eval_k)``. When ``eval_k`` is an
    int, eval keeps exactly the ``eval_k`` units with the largest ``log_alpha`` over ALL
    elements of the gate jointly, as float 0/1 (ties: lower flat index first).

    Args:
        shape: non-empty tuple of positive ints (an int n means ``(n,)``).
        init_log_alpha: float or tensor broadcastable to ``shape``: initial ``log_alpha``.
        trainable: register ``log_alpha`` as an ``nn.Parameter`` (True) or a buffer (False).

    Attributes:
        log_alpha: ``(*shape)`` Parameter (or buffer when not trainable).
        shape: the gate's shape.
        eval_k: ``int | None``; units kept in eval mode (None: the kind's own rule).

    Raises:
        ValueError: ``shape`` not a tuple of positive ints.
    """

    kind: str = "gate"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _READS_LOG_ALPHA:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_checks_log_alpha", False):
                setattr(cls, name, _checking_log_alpha(method))

    def check_log_alpha(self) -> None:
        """Raise ``ValueError`` if ``log_alpha`` holds NaN (the rule in the class docstring)."""
        nan = torch.isnan(self.log_alpha.detach())
        if bool(nan.any()):
            first = tuple(int(i) for i in nan.nonzero()[0])
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape}: log_alpha holds {int(nan.sum())} NaN value(s) "
                f"(first at index {first}); every gate kind refuses NaN logits (did the loss or the optimizer "
                "diverge?). +inf / -inf are allowed: surely kept / surely removed"
            )

    def __init__(
        self,
        shape: Sequence[int] | int,
        *,
        init_log_alpha: float | Tensor = 0.0,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.shape = _validate_shape(shape)
        init = torch.as_tensor(init_log_alpha, dtype=torch.float32).detach()
        try:
            log_alpha = torch.zeros(self.shape) + init
        except RuntimeError:
            log_alpha = None
        if log_alpha is None or tuple(log_alpha.shape) != self.shape:
            raise ValueError(
                f"init_log_alpha has shape {tuple(init.shape)}; "
                f"expected a float or a tensor broadcastable to {self.shape}"
            )
        if trainable:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        self._eval_k: int | None = None

    @classmethod
    def from_shape(cls, shape: Sequence[int] | int, **kwargs: Any) -> Gate:
        """Build a gate of ``shape`` from keyword options (used by :func:`make_gate`).

        Kinds whose constructor does not take a shape (e.g. ``FixedGate(mask)``) override this.
        """
        return cls(shape, **kwargs)

    # -- sizes ---------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        """Number of gated units N = prod(shape)."""
        return math.prod(self.shape)

    @property
    def eval_k(self) -> int | None:
        """Units kept in eval mode: None (the kind's own rule) or an int in [0, N]."""
        return self._eval_k

    @eval_k.setter
    def eval_k(self, value: int | None) -> None:
        self._eval_k = self._check_count("eval_k", value)

    def _check_count(self, name: str, value: int | None) -> int | None:
        """Validate a unit count: None or an int in [0, N]; ValueError naming what came."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.numel:
            raise ValueError(
                f"{name} must be None or an int in [0, numel] = [0, {self.numel}] for a gate of "
                f"shape {self.shape}; got {value!r}"
            )
        return value

    # -- masks ---------------------------------------------------------------------------

    def forward(self) -> Tensor:
        """Return the mask ``(*shape)`` in [0, 1]: a sample if training, else deterministic."""
        if self.training:
            return self.sample()
        return self.deterministic_mask(self.eval_k)

    def sample(self, *, generator: torch.Generator | None = None) -> Tensor:
        """Training-mode mask ``(*shape)`` in [0, 1] (random for stochastic kinds)."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")

    def _eval_mask(self) -> Tensor:
        """The kind's own evaluation mask ``(*shape)`` in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} must implement _eval_mask()")

    def deterministic_mask(self, k: int | None = None) -> Tensor:
        """Deterministic mask ``(*shape)``.

        Args:
            k: None for the kind's own evaluation rule; an int in [0, N] for exactly ``k``
                ones at the top-k of ``log_alpha`` over all elements (ties: lower flat index).

        Returns:
            ``(*shape)`` values in [0, 1] in the dtype of ``log_alpha``; float 0/1 if ``k``
            is an int (no gradient in that case).

        Raises:
            ValueError: ``k`` not None and not an int in [0, N], or NaN in ``log_alpha``.
        """
        self.check_log_alpha()
        if k is None:
            return self._eval_mask()
        k = self._check_count("k", k)
        return topk_mask(self.log_alpha.detach(), k).to(self.log_alpha.dtype)

    # -- sparsity ------------------------------------------------------------------------

    def expected_l0(self) -> Tensor:
        """``()`` expected number of units kept, in [0, N] (differentiable where possible)."""
        raise NotImplementedError(f"{type(self).__name__} must implement expected_l0()")

    def keep_probabilities(self) -> Tensor:
        """``(*shape)`` probability that each unit is kept, in [0, 1].

        Used to count expected remaining parameters unit by unit (CoFi, Xia, Zhong & Chen
        2022). Kinds override it with their exact per-unit value; this default spreads
        ``expected_l0()`` evenly over the N units (same sum, same gradient of the sum), so a
        user's gate that only defines ``expected_l0()`` still works.
        """
        l0 = self.expected_l0()
        return l0 / self.numel * torch.ones(self.shape, dtype=l0.dtype, device=l0.device)

    def keep_ratio(self) -> Tensor:
        """``()`` expected fraction of units kept, ``expected_l0() / N``, in [0, 1]."""
        return self.expected_l0() / self.numel

    def sparsity(self) -> Tensor:
        """``()`` expected fraction of units removed, ``1 - keep_ratio()``, in [0, 1]."""
        return 1.0 - self.keep_ratio()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, eval_k={self.eval_k}"


_READS_LOG_ALPHA = ("sample", "_eval_mask", "expected_l0", "keep_probabilities")


def _checking_log_alpha(method: Callable) -> Callable:
    """``method`` preceded by :meth:`Gate.check_log_alpha`."""
    @functools.wraps(method)
    def checked(self, *args: Any, **kwargs: Any):
        self.check_log_alpha()
        return method(self, *args, **kwargs)

    checked._checks_log_alpha = True
    return checked


# --------------------------------------------------------------------------------- registry


def register_gate(name: str) -> Callable[[GateT], GateT]:
    """Class decorator: register a :class:`Gate` subclass under ``name`` for :func:`make_gate`.

    Raises:
        ValueError: ``name`` already registered, or the class is not a Gate subclass.
    """

    def decorator(cls: GateT) -> GateT:
        if not (isinstance(cls, type) and issubclass(cls, Gate)):
            raise ValueError(f"register_gate({name!r}) expects a Gate subclass; got {cls!r}")
        if name in _GATE_REGISTRY:
            raise ValueError(
                f"gate name {name!r} is already registered to {_GATE_REGISTRY[name].__name__}; "
                "choose another name"
            )
        cls.kind = name
        _GATE_REGISTRY[name] = cls
        return cls

    return decorator


def available_gates() -> list[str]:
    """Sorted names accepted by :func:`make_gate`."""
    return sorted(_GATE_REGISTRY)


def make_gate(name: str, shape: Sequence[int] | int, **kwargs: Any) -> Gate:
    """Build the gate registered as ``name`` with the given ``shape`` and keyword options.

    Args:
        name: one of :func:`available_gates`.
        shape: tuple of positive ints.
        **kwargs: options of that gate's constructor (unknown keys raise TypeError).

    Returns:
        A new :class:`Gate` in training mode.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names), or bad options.
    """
    if name not in _GATE_REGISTRY:
        raise ValueError(f"unknown gate {name!r}; known gates: {', '.join(available_gates())}")
    return _GATE_REGISTRY[name].from_shape(shape, **kwargs)


# --------------------------------------------------------------------------- optimizer groups


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    gate_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a base group and a gate group for ``torch.optim.AdamW``.

    Every parameter owned by a :class:`Gate` submodule, or by a module whose class sets
    ``holds_gate_parameters = True`` (the token gates' scorers,
    :class:`learnmask.inject.tokens.TokenGates`), goes to the gate group, with
    ``lr = gate_lr`` (or ``lr`` when ``gate_lr`` is None) and ``weight_decay = 0.0``: decay
    would pull ``log_alpha`` towards 0, i.e. half-open gates, with no task signal (CoFi, Xia,
    Zhong & Chen 2022, trains its L0 gates without decay). Everything else with
    ``requires_grad`` goes to the base group with ``lr`` and ``weight_decay``. Empty groups are
    omitted; each group carries a ``"name"`` key ("base" or "gates").

    Args:
        model: any module, possibly containing gates (or a gate itself).
        lr: base learning rate, >= 0.
        weight_decay: base decoupled weight decay, >= 0.
        gate_lr: learning rate for gate parameters (None: ``lr``), >= 0.

    Returns:
        ``list[dict]`` with keys "params", "lr", "weight_decay", "name".

    Raises:
        ValueError: a negative learning rate or weight decay.
    """
    for key, value in (("lr", lr), ("weight_decay", weight_decay), ("gate_lr", gate_lr)):
        if value is not None and not float(value) >= 0.0:
            raise ValueError(f"{key} must be >= 0; got {value!r}")
    owners = [m for m in model.modules() if isinstance(m, Gate) or getattr(type(m), "holds_gate_parameters", False)]
    gate_ids = {id(p) for m in owners for p in m.parameters()}
    base, gates = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (gates if id(param) in gate_ids else base).append(param)
    groups = [
        {"params": base, "lr": lr, "weight_decay": weight_decay, "name": "base"},
        {"params": gates, "lr": lr if gate_lr is None else gate_lr, "weight_decay": 0.0,
         "name": "gates"},
    ]
    return [g for g in groups if g["params"]]
