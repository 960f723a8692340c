"""What a token-pruning run measures at its end: the tokens it really keeps, the FLOPs that saves,
and the inference throughput of its export (no learnmask hooks) against the same network with
every token (keep 1.0).

Throughput: batches of 1 (the first :data:`BATCH_1_EXAMPLES` held-out examples, one at a time)
and of 64 (the first 64 held-out examples as one batch, padded to their longest), on 2 threads,
in inference mode. One warm-up pass, then :data:`TIMED_PASSES` timed passes of each model,
interleaved (full, export, full, ...) so drifting load from other processes hits both alike;
each model's time is its fastest pass (see :mod:`learnmask.recipe.measure`). A pass runs its
batches as many times as make the full model's warm-up pass last :data:`MIN_PASS_SECONDS`
(the ViT's batch of 64 takes about 0.1 s: the fastest of three such passes moved the ratio by
up to 0.5 between runs).

FLOPs (multiply-adds × 2) of one encoder layer on ``n`` tokens of width ``d`` with an MLP of
``I`` units: ``2n(4d² + 2dI)`` for its linear maps plus ``4n²d`` for attention scores and values
(Kaplan et al. 2020's accounting; norms, softmax and the embeddings are left out). Each
example is counted with its own real tokens, before and after each pruning layer.

Legend: ``N`` examples, ``C`` classes, ``n`` pruning layers.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from learnmask.recipe.measure import TIE_MARGIN, FinalizeMismatch
from learnmask.recipe.token_tasks import Examples

THREADS = 2
BATCH_SIZES = (1, 64)
BATCH_1_EXAMPLES = 16
WARMUP_PASSES = 1
TIMED_PASSES = 5
#: Shortest timed pass, seconds: shorter passes repeat their batches (see the module).
MIN_PASS_SECONDS = 1.0
#: Held-out examples over which the gates' expected keep ratio is averaged (a mean in [0, 1]:
#: 256 examples pin it well within the ±0.02 it is compared with; over all 445 BBC articles the
#: measurement took a gated forward pass of each inside every learned text run's training time).
HELDOUT_KEEP_EXAMPLES = 256


def layer_flops(n: Tensor, d: int, intermediate: int) -> Tensor:
    """FLOPs of one encoder layer on ``n`` tokens (any shape of counts; see the module)."""
    n = n.to(torch.float64)
    return 2 * n * (4 * d * d + 2 * d * intermediate) + 4 * n * n * d


def flop_reduction(n_real: Tensor, ratios: tuple[float, ...], token_layers: tuple[int, ...], depth: int, d: int,
                   intermediate: int) -> dict[str, float]:
    """Fraction of the encoder's FLOPs that pruning removes.

    Args:
        n_real: ``(N,)`` real tokens per example (CLS included).
        ratios: keep ratio after each pruning layer, in (0, 1] (what eval keeps:
            ``max(1, round(r * n_real))`` tokens).
        token_layers: the pruning layers; ``depth``: layers of the encoder.

    Returns:
        ``flop_reduction``: of the whole encoder; ``flop_reduction_after_first``: of the layers
        after the first pruning layer (where every saving is), both in [0, 1).
    """
    from learnmask.inject.tokens import keep_counts

    counts = n_real.clone()
    full, pruned, full_after, pruned_after = 0.0, 0.0, 0.0, 0.0
    for layer in range(depth):
        dense = float(layer_flops(n_real, d, intermediate).sum())
        kept = float(layer_flops(counts, d, intermediate).sum())
        full, pruned = full + dense, pruned + kept
        if layer > token_layers[0]:
            full_after, pruned_after = full_after + dense, pruned_after + kept
        if layer in token_layers:
            counts = keep_counts(n_real, ratios[token_layers.index(layer)])
    return {"flop_reduction": 1.0 - pruned / full, "flop_reduction_after_first": 1.0 - pruned_after / full_after}


def realized_keep(masks: list[list[Tensor]], n_real: Tensor) -> list[float]:
    """Mean over examples of the fraction of real tokens kept after each pruning layer.

    Args:
        masks: per batch, per pruning layer, ``(B, S0)`` bool kept tokens (``handle.token_masks()``).
        n_real: ``(N,)`` real tokens of the same examples in order.
    """
    stages = len(masks[0])
    kept = [torch.cat([batch[stage].sum(dim=1) for batch in masks]) for stage in range(stages)]
    return [float((k.double() / n_real.double()).mean()) for k in kept]


@torch.no_grad()
def gated_eval(model: nn.Module, handle, data: Examples, batch_size: int = 64) -> tuple[Tensor, list[float]]:
    """``(N, C)`` logits of the token-gated model in eval (tokens dropped) and the realized keep
    ratio after each pruning layer (:func:`realized_keep`)."""
    model.eval()
    logits, masks = [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(data)))), labels=False)
        logits.append(model(**batch).logits.float())
        masks.append(handle.token_masks())
    return torch.cat(logits), realized_keep(masks, data.real_tokens())


@torch.no_grad()
def heldout_expected_keep(model: nn.Module, handle, data: Examples, batch_size: int = 64,
                          max_examples: int = HELDOUT_KEEP_EXAMPLES) -> float:
    """The training-time expected keep ratio (:meth:`~learnmask.inject.MaskHandle.expected_keep_ratio`,
    what the controller drives) averaged over the first ``max_examples`` held-out examples (all
    when fewer): the model in training mode (gate samples, dropout), no gradient, no update. One
    batch's value moves with its examples (a batch of dark images has fewer patches worth
    keeping); over held-out examples it says where the gates really are (LTP's keep-ratio drift,
    Kim et al. 2022). Leaves the model in eval mode."""
    model.train()
    total, count = 0.0, min(len(data), max_examples)
    try:
        for start in range(0, count, batch_size):
            rows = list(range(start, min(start + batch_size, count)))
            model(**data.batch(rows, labels=False))
            total += float(handle.expected_keep_ratio("tokens")) * len(rows)
    finally:
        model.eval()
    return total / count


def check_export(gated: Tensor, exported: Tensor) -> dict:
    """The export predicts what the gated model does (ties within :data:`TIE_MARGIN` excepted).

    Raises:
        FinalizeMismatch: a prediction differs where the gated model has no tie.
    """
    top2 = gated.topk(min(2, gated.shape[-1]), dim=-1).values
    tie = (top2[:, 0] - top2[:, -1]) <= TIE_MARGIN
    differ = (gated.argmax(-1) != exported.argmax(-1)) & ~tie
    diff = (gated - exported).abs().max().item()
    if bool(differ.any()):
        raise FinalizeMismatch(f"the exported model predicts {int(differ.sum())} held-out examples differently from "
                               f"the gated model (max logit difference {diff:.3g}); expected the same predictions")
    return {"export_max_logit_diff": diff}


def _inputs(data: Examples, batch_size: int) -> list[dict[str, Tensor]]:
    if batch_size == 1:
        return [data.batch([i], labels=False) for i in range(min(len(data), BATCH_1_EXAMPLES))]
    return [data.batch(list(range(min(len(data), batch_size))), labels=False)]


@torch.inference_mode()
def throughput(models: dict[str, nn.Module], data: Examples) -> dict[str, dict[int, float]]:
    """Examples per second of each model at each of :data:`BATCH_SIZES` (see the module).

    Returns:
        name -> batch size -> examples per second (fastest pass).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    speed: dict[str, dict[int, float]] = {name: {} for name in models}
    try:
        for model in models.values():
            model.eval()
        for size in BATCH_SIZES:
            inputs = _inputs(data, size)
            examples = sum(len(next(iter(batch.values()))) for batch in inputs)
            times: dict[str, list[float]] = {name: [] for name in models}
            repeats = 1
            for repeat in range(WARMUP_PASSES + TIMED_PASSES):
                for name, model in models.items():
                    started = time.perf_counter()
                    for _ in range(repeats):
                        for batch in inputs:
                            model(**batch)
                    seconds = (time.perf_counter() - started) / repeats
                    if repeat >= WARMUP_PASSES:
                        times[name].append(seconds)
                    elif name == "full":
                        repeats = max(1, math.ceil(MIN_PASS_SECONDS / max(seconds, 1e-6)))
            for name in models:
                speed[name][size] = examples / min(times[name])
    finally:
        torch.set_num_threads(threads)
    return speed


def speed_metrics(speed: dict[str, dict[int, float]], reduction: float) -> dict:
    """Throughput of ``"export"`` relative to ``"full"`` at each batch size, and how much of the
    FLOP reduction the time saved at batch 64 realizes (1.0: time falls as FLOPs do)."""
    out = {}
    for size in BATCH_SIZES:
        relative = speed["export"][size] / speed["full"][size]
        out[f"relative_throughput_b{size}"] = relative
        out[f"time_saved_b{size}"] = 1.0 - 1.0 / relative
    out["time_saved_over_flops_b64"] = out["time_saved_b64"] / reduction if reduction > 0 else None
    out["throughput"] = {f"b{size}": {name: round(speed[name][size], 2) for name in speed} for size in BATCH_SIZES}
    out["throughput"].update(threads=THREADS, timed_passes=TIMED_PASSES, min_pass_seconds=MIN_PASS_SECONDS)
    return out
