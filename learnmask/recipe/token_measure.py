"""What a token-pruning run measures at its end: the tokens it really keeps, the FLOPs that saves,
and the inference throughput of its export (no learnmask hooks) against the same network with
every token (keep 1.0).

Throughput: batches of 1 (the first :data:`BATCH_1_EXAMPLES` held-out examples, one at a time)
and of 64 (the first 64 held-out examples as one batch, padded to their longest), on 2 threads,
in inference mode. :data:`WARMUP_PASSES` untimed passes of each model, then timed pairs of
passes, one of each model back to back (which goes first alternates), at least
:data:`MIN_PAIRS` of them and more until :data:`TIMING_SECONDS` have passed (at most
:data:`MAX_PAIRS`). The export's speed relative to the full model is the median over pairs of
``full seconds / export seconds``: load that drifts hits both passes of a pair alike and
cancels in its ratio, and a burst of load spoils one pair, which the median ignores. The
records keep the quartiles of the pair ratios too. (The rule before, the fastest of 5
one-second passes of each model, gave the same ViT export at keep 0.7 a time/FLOPs ratio
whose 5th-95th percentiles over resampled runs spanned 0.66-0.95; the median of 25 short pairs,
0.94-1.03 within one process. Separate processes still differ by up to about 0.1.)

FLOPs (multiply-adds × 2) of one encoder layer on ``n`` tokens of width ``d`` with an MLP of
``I`` units: ``2n(4d² + 2dI)`` for its linear maps plus ``4n²d`` for attention scores and values
(Kaplan et al. 2020's accounting; norms, softmax and the embeddings are left out). Each
example is counted with its own real tokens, before and after each pruning layer.

Legend: ``N`` examples, ``C`` classes, ``n`` pruning layers.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

from learnmask.recipe.measure import TIE_MARGIN, FinalizeMismatch, timed_pass
from learnmask.recipe.token_tasks import Examples

THREADS = 2
BATCH_SIZES = (1, 64)
BATCH_1_EXAMPLES = 16
WARMUP_PASSES = 2
#: Timed pairs of passes per batch size: at least MIN_PAIRS, then more until TIMING_SECONDS have
#: passed since the first, at most MAX_PAIRS (see the module). A MiniLM pass at batch 64 and
#: length 256 takes about 2.7 s on 2 threads, so the time budget alone gave the text exports the
#: minimum; with 5 pairs the four text exports at keep 0.7 (the same tokens per example, so the
#: same work) came out at time/FLOPs 0.79, 0.91, 0.98 and 1.02. 11 pairs (odd: the median is one
#: pair) cost about 35 s more per text run; the ViT reaches 17-21 pairs within the budget.
MIN_PAIRS = 11
TIMING_SECONDS = 8.0
MAX_PAIRS = 200
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


def pair_ratios(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """Relative throughput of the export from timed pairs of passes.

    Args:
        pairs: ``(full seconds, export seconds)`` of each pair, both > 0.

    Returns:
        ``relative``: the median of ``full / export`` over pairs (> 1: the export is faster);
        ``q1``, ``q3``: their quartiles (the median itself for fewer than 2 pairs).
    """
    ratios = [full / export for full, export in pairs]
    if len(ratios) < 2:
        return {"relative": ratios[0], "q1": ratios[0], "q3": ratios[0]}
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"relative": median, "q1": q1, "q3": q3}


@torch.inference_mode()
def throughput(models: dict[str, nn.Module], data: Examples) -> dict[int, dict[str, float]]:
    """The export's throughput against the full model at each of :data:`BATCH_SIZES` (see the
    module).

    Args:
        models: ``{"full": model with every token, "export": the export}`` (the same model twice
            for a run without pruning).

    Returns:
        batch size -> ``full`` and ``export`` (examples per second, from each model's median
        pass), ``relative``, ``q1``, ``q3`` (:func:`pair_ratios`) and ``pairs`` (how many).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    timing: dict[int, dict[str, float]] = {}
    try:
        for model in models.values():
            model.eval()
        for size in BATCH_SIZES:
            inputs = _inputs(data, size)
            examples = sum(len(next(iter(batch.values()))) for batch in inputs)
            for _ in range(WARMUP_PASSES):
                for model in models.values():
                    timed_pass(model, inputs)
            pairs: list[tuple[float, float]] = []
            started = time.perf_counter()
            while len(pairs) < MIN_PAIRS or (len(pairs) < MAX_PAIRS and time.perf_counter() - started < TIMING_SECONDS):
                order = ("full", "export") if len(pairs) % 2 == 0 else ("export", "full")
                seconds = {name: timed_pass(models[name], inputs) for name in order}
                pairs.append((seconds["full"], seconds["export"]))
            timing[size] = {"full": examples / statistics.median(p[0] for p in pairs),
                            "export": examples / statistics.median(p[1] for p in pairs),
                            **pair_ratios(pairs), "pairs": len(pairs)}
    finally:
        torch.set_num_threads(threads)
    return timing


def speed_metrics(timing: dict[int, dict[str, float]], reduction: float) -> dict:
    """Throughput of the export relative to the full model at each batch size (:func:`throughput`),
    and how much of the FLOP reduction the time saved at batch 64 realizes (1.0: time falls as
    FLOPs do), with the quartiles of the pair ratios behind each."""
    out: dict = {}
    for size in BATCH_SIZES:
        relative = timing[size]["relative"]
        out[f"relative_throughput_b{size}"] = relative
        out[f"relative_throughput_b{size}_quartiles"] = [timing[size]["q1"], timing[size]["q3"]]
        out[f"time_saved_b{size}"] = 1.0 - 1.0 / relative
    if reduction > 0:
        out["time_saved_over_flops_b64"] = out["time_saved_b64"] / reduction
        out["time_saved_over_flops_b64_quartiles"] = [(1.0 - 1.0 / timing[64][q]) / reduction for q in ("q1", "q3")]
    else:
        out["time_saved_over_flops_b64"] = None
    out["throughput"] = {f"b{size}": {name: round(timing[size][name], 2) for name in ("full", "export")}
                         | {"pairs": timing[size]["pairs"]} for size in BATCH_SIZES}
    out["throughput"].update(threads=THREADS, min_pairs=MIN_PAIRS, timing_seconds=TIMING_SECONDS)
    return out
