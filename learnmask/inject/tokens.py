"""Token gates: per example, which tokens the later layers of a transformer still see.

After each pruning layer (``MaskConfig.token_layers``) a small scorer reads the hidden states and
gives every token a logit ``log_alpha``; a gate kind turns the logits into keep values
``z`` in [0, 1]. Decisions are cumulative (the keep value after pruning layer i is the product of
the stage values so far, so a token closed after layer l stays closed), the first (CLS-like)
token is never closed and padding is never kept.

- Training: tokens stay in the tensor; the keep values reach every later layer's attention as
  the masked-attention op's ``token_gate`` (a closed token is no key for anyone; its own row is
  still computed), so gradients reach the scorers and the batch keeps its shape (DynamicViT,
  Rao et al. 2021; LTP, Kim et al. 2022).
- Eval: per example exactly ``max(1, round(r_i * n_real))`` tokens are kept after pruning layer
  i (top-k of the scores, CLS always kept; ``r_i`` the target keep ratio there), gathered, and
  the remaining layers run on the shorter sequence with a padding mask of the gathered length
  (PoWER-BERT, Goyal et al. 2020). ``handle.token_inference = "mask"`` keeps the same hard
  decisions as a ``token_gate`` instead (the training-time path with the eval mask: the same
  outputs for the kept tokens, no speedup).

Legend: ``B`` batch, ``S`` tokens in the current tensor (shrinks after a gather in eval), ``d``
hidden size, ``n`` pruning layers.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from learnmask.functional import gumbel_sigmoid, hard_concrete_sample, prob_nonzero, straight_through_threshold
from learnmask.gates import GumbelSigmoidGate, HardConcreteGate, ThresholdGate, TopKGate, make_gate
from learnmask.sampling import generator_for

__all__ = ["TOKEN_GATE_KINDS", "TokenScorer", "TokenGates", "TokenState", "eval_keep", "gather_kept", "keep_ratios",
           "topk_keep"]

#: Gate kinds a token gate can sample with.
TOKEN_GATE_KINDS = ("hard_concrete", "gumbel_sigmoid", "threshold", "topk")
#: Architectures whose tokens can be gated (``LayerSpec.arch``).
TOKEN_ARCHS = ("bert", "distilbert", "vit", "transformer_encoder_layer")


def keep_ratios(keep_ratio: float | tuple[float, ...], stages: int) -> tuple[float, ...]:
    """Fraction of real tokens kept after each of ``stages`` pruning layers, each in (0, 1].

    A float r gives ``r^((i+1)/n)`` (DynamicViT's geometric schedule, Rao et al. 2021), so the
    last stage keeps r; a tuple is returned as it is.
    """
    if isinstance(keep_ratio, tuple):
        return keep_ratio
    return tuple(float(keep_ratio) ** ((i + 1) / stages) for i in range(stages))


def keep_counts(n_real: Tensor, ratio: float) -> Tensor:
    """``(B,)`` tokens kept per example: ``max(1, round(ratio * n_real))`` (CLS included)."""
    return torch.round(n_real.to(torch.float64) * ratio).long().clamp_min(1)


def topk_keep(scores: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
    """``(B, S)`` bool: the first token and the ``counts - 1`` eligible tokens of largest score.

    Args:
        scores: ``(B, S)`` real scores (ties: the lower position first).
        eligible: ``(B, S)`` bool, tokens that may be kept (real, still open, not the first).
        counts: ``(B,)`` tokens to keep per example, the first included (>= 1).
    """
    masked = torch.where(eligible, scores.detach().float(), torch.finfo(torch.float32).min)
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    keep = (rank < (counts - 1)[:, None]) & eligible
    keep[:, 0] = True
    return keep


def eval_keep(log_alpha: Tensor, open_: Tensor, n_real: Tensor, ratio: float) -> Tensor:
    """``(B, S)`` bool: the eval decision of one pruning layer (the rule the gated model in eval
    and its export share): the first token and the ``max(1, round(ratio * n_real)) - 1`` open
    tokens of largest ``log_alpha``.

    Args:
        log_alpha: ``(B, S)`` the scorer's logits.
        open_: ``(B, S)`` bool, tokens still open (real, not closed by an earlier stage).
        n_real: ``(B,)`` real tokens per example in the model's input.
        ratio: fraction of the input's real tokens kept after this layer, in (0, 1].
    """
    eligible = open_.clone()
    eligible[:, 0] = False
    return topk_keep(log_alpha, eligible, keep_counts(n_real, ratio))


def gather_kept(hard: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the tokens ``hard`` of ``hidden`` in their original order, each example padded to
    the longest with copies of its first token.

    Args:
        hard: ``(B, S)`` bool, tokens kept (the first always).
        hidden: ``(B, S, d)``.

    Returns:
        ``(gathered, index, valid)``: ``(B, S', d)`` kept hidden states (S' the most tokens any
        example keeps), ``(B, S')`` their positions in ``hidden`` (0 on padding), ``(B, S')`` bool
        real (kept) tokens of the gathered tensor.
    """
    batch, length = hard.shape
    positions = torch.arange(length, device=hard.device).expand(batch, length)
    order = torch.sort(torch.where(hard, positions, positions + length), dim=1).values
    counts = hard.sum(dim=1)
    width = int(counts.max())
    valid = torch.arange(width, device=hard.device)[None, :] < counts[:, None]
    index = torch.where(valid, order[:, :width], torch.zeros_like(order[:, :width]))
    gathered = torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return gathered, index, valid


class TokenScorer(nn.Module):
    """``log_alpha = Linear(LayerNorm(h))``: one keep logit per token (DynamicViT's predictor,
    reduced to a norm and a linear map, Rao et al. 2021).

    Input ``(B, S, d)``; output ``(B, S)`` real logits in the input's dtype. The bias starts at
    the gate kind's initial ``log_alpha`` (nearly open by default), the weight near 0.
    """

    def __init__(self, hidden_size: int, init_log_alpha: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.constant_(self.linear.bias, float(init_log_alpha))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(self.norm(hidden)).squeeze(-1)


class TokenGates(nn.Module):
    """The scorers of every pruning layer and the gate kind that samples from their logits.

    Args:
        hidden_size: d.
        layers: indices of the pruning layers (``MaskConfig.token_layers``).
        keep_ratio: ``MaskConfig.token_keep_ratio`` (see :func:`keep_ratios`).
        kind: one of :data:`TOKEN_GATE_KINDS`.
        options: that kind's options (validated by building the gate of shape ``(1,)``, whose
            initial ``log_alpha`` becomes every scorer's bias).

    Attributes:
        scorers: ``nn.ModuleList`` of :class:`TokenScorer`, one per pruning layer.
        ratios: ``(n,)`` target fraction of real tokens kept after each pruning layer.
        template: the ``(1,)`` gate whose hyperparameters (temperature, stretch, ...) apply.

    Raises:
        ValueError: a kind that cannot gate tokens, or bad options for it.
    """

    #: Its parameters are gate parameters: :func:`learnmask.gates.param_groups` puts the scorers
    #: in the gate group (``gate_lr``, no weight decay), as ``MaskHandle.gate_parameters`` does.
    holds_gate_parameters = True

    def __init__(self, hidden_size: int, layers: tuple[int, ...], keep_ratio: float | tuple[float, ...],
                 kind: str, options: dict) -> None:
        super().__init__()
        if kind not in TOKEN_GATE_KINDS:
            raise ValueError(f"token_gate {kind!r} cannot gate tokens; expected one of {list(TOKEN_GATE_KINDS)}")
        options = dict(options)
        if kind == "topk":
            options.pop("init_keep_ratio", None)  # topk keeps its count from token_keep_ratio
        template = make_gate(kind, (1,), **options)
        self.__dict__["template"] = template  # hyperparameters only: not a submodule, no parameters
        self.kind, self.layers = kind, tuple(layers)
        self.ratios = keep_ratios(keep_ratio, len(layers))
        init = float(template.log_alpha.detach()[0])
        self.scorers = nn.ModuleList(TokenScorer(hidden_size, init) for _ in layers)

    def harden(self) -> None:
        """Train with the eval rule from now on: every stage keeps exactly its top-k tokens of
        the learned scores (the ``topk`` kind, straight-through gradient), so the network
        adapts to the very decisions it will be evaluated and exported with (LTP's hard
        pruning stage after its soft one, Kim et al. 2022). The ratios stay where they are; a
        penalty controller then has nothing left to move (the expected keep ratio is the exact
        kept fraction). Irreversible for this object; state_dict unchanged."""
        self.__dict__["template"] = make_gate("topk", (1,))
        self.kind = "topk"

    def stage_of(self, row: int) -> int | None:
        """Index of pruning layer ``row`` among :attr:`layers`, or None."""
        return self.layers.index(row) if row in self.layers else None

    def sample(self, log_alpha: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
        """``(B, S)`` training keep values in [0, 1] of the gate kind, differentiable in ``log_alpha``.

        ``topk``: the per-example top-k of :func:`topk_keep` (``counts`` tokens), with a
        straight-through (identity) gradient (Sanh, Wolf & Rush 2020).
        """
        t = self.template
        noise = generator_for(log_alpha.device, "per_example")  # None: torch's global generator
        if isinstance(t, HardConcreteGate):
            return hard_concrete_sample(log_alpha, temperature=t.temperature, stretch=t.stretch, generator=noise)
        if isinstance(t, GumbelSigmoidGate):
            return gumbel_sigmoid(log_alpha, temperature=t.temperature, hard=t.hard, generator=noise)
        if isinstance(t, ThresholdGate):
            return straight_through_threshold(log_alpha, t.threshold)
        assert isinstance(t, TopKGate)
        hard = topk_keep(log_alpha, eligible, counts).to(log_alpha.dtype)
        return hard + (log_alpha - log_alpha.detach())

    def keep_probability(self, log_alpha: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
        """``(B, S)`` probability in [0, 1] that each token is kept by one stage (differentiable
        except for ``topk``, whose value is its hard mask)."""
        t = self.template
        if isinstance(t, HardConcreteGate):
            return prob_nonzero(log_alpha, temperature=t.temperature, stretch=t.stretch)
        if isinstance(t, GumbelSigmoidGate):
            return torch.sigmoid(log_alpha)
        if isinstance(t, ThresholdGate):
            return straight_through_threshold(log_alpha, t.threshold)
        return topk_keep(log_alpha, eligible, counts).to(log_alpha.dtype)

    @property
    def target_keep_ratio(self) -> float:
        """The keep ratio a controller drives :meth:`TokenState.expected_keep_ratio` to: the mean
        of the per-layer targets :attr:`ratios` (the target itself with one pruning layer)."""
        return sum(self.ratios) / len(self.ratios)

    @property
    def keep_ratio(self) -> float:
        """Fraction of real tokens kept after the last pruning layer, in (0, 1] (``ratios[-1]``).

        Setting it to r moves every stage along its geometric curve: stage i keeps
        ``ratios[i] ** (log r / log ratios[-1])`` (so DynamicViT's default schedule
        ``r^((i+1)/n)``, Rao et al. 2021, stays that schedule; it is also what stages that all
        kept 1 get), the last stage exactly r. This is
        what a :class:`~learnmask.control.LossAdaptiveController` with ``harder="down"`` moves
        from the task loss (``tokens.keep_ratio = controller.update(loss)``); a penalty
        controller built on :meth:`sparsity_target` then follows it. The eval decisions (and an
        export made afterwards) use the new ratios.

        Raises:
            ValueError: (setter) a value outside (0, 1].
        """
        return self.ratios[-1]

    @keep_ratio.setter
    def keep_ratio(self, ratio: float) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be a fraction in (0, 1]; got {ratio!r}")
        last = self.ratios[-1]
        if last == 1.0:
            self.ratios = keep_ratios(float(ratio), len(self.ratios))
        else:
            power = math.log(float(ratio)) / math.log(last)
            self.ratios = (*(r ** power for r in self.ratios[:-1]), float(ratio))

    def sparsity_target(self, step: int = 0) -> float:
        """``1 - target_keep_ratio`` now, in [0, 1): a target schedule (``step -> target``) for
        :class:`~learnmask.control.LagrangianController` or
        :class:`~learnmask.control.PIController` that follows :attr:`keep_ratio` wherever it
        is moved (``step`` is ignored)."""
        del step
        return 1.0 - self.target_keep_ratio


@dataclasses.dataclass
class TokenState:
    """What one forward pass decided about its tokens (reset at each forward of the model).

    Attributes:
        valid: ``(B, S)`` bool, real tokens of the current tensor (None until first seen).
        n_real: ``(B,)`` real tokens per example in the input.
        keep: ``(B, S)`` cumulative keep values in [0, 1] (training / ``"mask"`` mode), None
            before the first pruning layer.
        probability: ``(B, S)`` probability that each token is still kept (product over the
            stages so far; training), None before the first pruning layer.
        index: ``(B, S)`` original position of each token of the current tensor (``"drop"``
            mode after a gather), None before.
        dropped: whether the current tensor is gathered (``"drop"`` mode, after a pruning layer).
        length: S0, the input's length.
        kept: per pruning layer, ``(B, S_in)`` bool hard decisions (S_in: the positions of the
            original input), for inspection.
        expected: per pruning layer, ``(B,)`` expected tokens kept (differentiable in training).
    """

    valid: Tensor | None = None
    n_real: Tensor | None = None
    keep: Tensor | None = None
    probability: Tensor | None = None
    index: Tensor | None = None
    dropped: bool = False
    length: int = 0
    kept: list[Tensor] = dataclasses.field(default_factory=list)
    expected: list[Tensor] = dataclasses.field(default_factory=list)

    def observe(self, valid: Tensor) -> None:
        """Record the real tokens ``(B, S)`` of the input (first call of a pass only).

        Raises:
            ValueError: the first token of some example is padding (token gating keeps the
                first token as CLS; left padding is not supported).
        """
        if self.valid is not None:
            return
        valid = valid.to(torch.bool)
        if not bool(valid[:, 0].all()):
            rows = (~valid[:, 0]).nonzero().flatten().tolist()
            raise ValueError(f"token gates keep the first token of every example (CLS); examples {rows} have "
                             "padding there: pad on the right")
        self.valid, self.n_real, self.length = valid, valid.sum(dim=1), valid.shape[1]

    def expected_keep_ratio(self) -> Tensor:
        """``()`` mean over pruning layers and examples of the expected fraction of real tokens
        kept, in [0, 1].

        Raises:
            ValueError: no forward pass has gone through a pruning layer yet.
        """
        if not self.expected:
            raise ValueError("no token decisions yet: run a forward pass of the gated model first")
        fractions = [e / self.n_real.to(e.dtype) for e in self.expected]
        return torch.stack(fractions).mean()
