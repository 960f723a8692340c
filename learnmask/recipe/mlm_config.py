"""The validated config of one continued-MLM run (``recipe = "mlm"`` in a grid file).

Kept apart from :mod:`learnmask.recipe.mlm` so that parsing a grid needs neither torch
models nor data.
"""
from __future__ import annotations

import dataclasses

from learnmask.control.rate_schedules import RATE_SCHEDULE_KINDS
from learnmask.masks.collate import STRATEGIES
from learnmask.recipe.validated import ValidatedConfig

#: How the masking rate moves: a fixed schedule or the loss-adaptive controller.
RATE_MODES = (*RATE_SCHEDULE_KINDS, "adaptive")
_UNIT = ("mlm_probability", "final_mlm_probability", "rate_min", "rate_max", "eval_mlm_probability", "warmup_ratio")


@dataclasses.dataclass(frozen=True)
class MLMRunConfig(ValidatedConfig):
    """Continued masked-LM training of a BERT-family encoder on Shakespeare, one masking-rate policy.

    Attributes:
        schedule: how ``mlm_probability`` moves over the ``steps``: ``constant``, ``linear``
            or ``cosine`` from ``mlm_probability`` to ``final_mlm_probability`` (Ankner et
            al., 2023), or ``adaptive`` (:class:`~learnmask.control.LossAdaptiveController`
            starting at ``mlm_probability``, kept in ``[rate_min, rate_max]``, moved by at most
            ``adaptive_max_step`` per step, running loss level with weight ``adaptive_ema``).
        mlm_probability, final_mlm_probability: rates in [0, 1] (fraction of real non-special
            tokens selected; Wettig et al., 2023 argue for 0.4 over BERT's 0.15).
        strategy: token selection: ``token``, ``whole_word``, ``span`` or ``entity`` is
            rejected here (no entity annotations in the corpus).
        seed: seeds the MLM-head initialisation and warm-up, data order, masks and dropout.
        model_path: local BERT-family folder; empty = the packaged all-MiniLM-L6-v2.
        heldout_plays: plays held out for evaluation (fixed split, seed 0).
        max_length: tokens per training chunk, ``[CLS]`` and ``[SEP]`` included.
        batch_size, steps, lr, weight_decay, warmup_ratio: the compared training phase (AdamW,
            linear warm-up then linear decay of the learning rate).
        freeze: parameter-name substrings kept frozen. The word embeddings by default: the
            decoder of the MLM head is *tied* to them, so the output projection stays the
            pretrained embedding matrix and only the head's transform and bias adapt on the
            output side (a step is ~30% cheaper, and 11.7M parameters leave AdamW).
        head_warmup_steps, head_lr: the warm-up of the (not pretrained) MLM head alone at 15%
            before the compared phase, cached per seed so every row starts from the same weights.
        eval_chunks, eval_mlm_probability, eval_seed: held-out chunks masked once, at a
            *fixed* rate with a fixed generator: every row is scored on the same positions.
        checkpoint_every: steps between checkpoints (exact resume).
    """

    schedule: str = "constant"
    mlm_probability: float = 0.15
    final_mlm_probability: float = 0.15
    rate_min: float = 0.15
    rate_max: float = 0.4
    adaptive_ema: float = 0.95
    adaptive_tolerance: float = 0.0
    adaptive_max_step: float = 0.01
    strategy: str = "token"
    seed: int = 0
    model_path: str = ""
    heldout_plays: int = 3
    max_length: int = 128
    batch_size: int = 16
    steps: int = 120
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    freeze: tuple[str, ...] = ("embeddings.word_embeddings",)
    head_warmup_steps: int = 100
    head_lr: float = 2e-3
    eval_chunks: int = 128
    eval_mlm_probability: float = 0.15
    eval_seed: int = 1234
    checkpoint_every: int = 40

    def __post_init__(self):
        self._check_types()
        if self.schedule not in RATE_MODES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {list(RATE_MODES)}")
        if self.strategy not in STRATEGIES or self.strategy == "entity":
            raise ValueError("strategy must be one of ['token', 'whole_word', 'span'] for this corpus; "
                             f"got {self.strategy!r}")
        for name in _UNIT:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a fraction of tokens); got {getattr(self, name)}")
        if self.schedule == "adaptive" and not self.rate_min <= self.mlm_probability <= self.rate_max:
            raise ValueError(f"adaptive: mlm_probability {self.mlm_probability} must lie in [rate_min, rate_max] = "
                             f"[{self.rate_min}, {self.rate_max}]")
        if not 0.0 < self.adaptive_ema < 1.0 or not 0.0 < self.adaptive_max_step <= 1.0 or self.adaptive_tolerance < 0:
            raise ValueError("need adaptive_ema in (0, 1), adaptive_max_step in (0, 1] and adaptive_tolerance >= 0; "
                             f"got {self.adaptive_ema}, {self.adaptive_max_step}, {self.adaptive_tolerance}")
        for name in ("heldout_plays", "batch_size", "steps", "eval_chunks", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.max_length < 8 or self.head_warmup_steps < 0:
            raise ValueError("need max_length >= 8 and head_warmup_steps >= 0; "
                             f"got {self.max_length}, {self.head_warmup_steps}")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        object.__setattr__(self, "freeze", tuple(self.freeze))

    def head_key(self) -> str:
        """Id of the head warm-up (and the held-out set): runs that share it share the warmed head."""
        fields = ("seed", "model_path", "heldout_plays", "max_length", "batch_size", "head_warmup_steps", "head_lr",
                  "eval_chunks", "eval_mlm_probability", "eval_seed")
        return self._hash({name: getattr(self, name) for name in fields})
