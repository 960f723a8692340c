"""Where a gated run ends: the finalized model checked against the gated one, and measured
inference throughput relative to the dense model.

Throughput: batches of 32 held-out examples (the first 128, fixed order, each batch padded
to its own longest sequence) on 2 threads, in inference mode. One warm-up pass, then 7 timed
passes of every model, interleaved (dense, finalized, dense, ...) so that drifting load from
other processes hits both alike; each model's time is its fastest pass (another process can
only add time to a pass, so the fastest is the least disturbed; a median let one burst of load
on a shared machine turn a 1.2x speed-up into 0.8x). The dense model is the same
network with its gates detached (its own attention, nothing removed), in the same process, on
the same batches.

Legend: N held-out examples, C classes.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import ContextManager

import torch
from torch import Tensor, nn

from learnmask.recipe.model import EncodedTexts, batches

THROUGHPUT_BATCH_SIZE = 32
THROUGHPUT_THREADS = 2
THROUGHPUT_BATCHES = 4
WARMUP_PASSES = 1
TIMED_PASSES = 7
#: Predictions of the gated and the finalized model may differ only where the gated model's two
#: best logits are this close (a tie that float rounding can break either way).
TIE_MARGIN = 1e-4


class FinalizeMismatch(ValueError):
    """The finalized model does not compute what the gated model computes (a learnmask bug)."""


@torch.no_grad()
def logits_of(model: nn.Module, data: EncodedTexts, pad_id: int, batch_size: int = 128) -> Tensor:
    """``(N, C)`` logits of ``model`` in eval mode (deterministic gates), in data order."""
    model.eval()
    out = []
    for batch in batches(data, list(range(len(data))), batch_size, pad_id):
        batch.pop("labels")
        out.append(model(**batch).logits.float())
    return torch.cat(out)


def accuracy_of(logits: Tensor, data: EncodedTexts) -> float:
    """Fraction of ``data`` whose argmax logit is its label, in [0, 1]."""
    return (logits.argmax(-1) == torch.tensor(data.labels)).sum().item() / len(data)


def check_finalized(gated: Tensor, finalized: Tensor, data: EncodedTexts, *, parameters: int,
                    finalized_parameters: int) -> dict:
    """The finalized model predicts what the gated one does and has the reported size.

    Args:
        gated, finalized: ``(N, C)`` held-out logits of the gated model (eval) and of
            :func:`learnmask.finalize`'s model.
        parameters: the count reported from the gates; ``finalized_parameters``: the real one.

    Returns:
        ``finalized_accuracy`` and ``finalize_max_logit_diff``.

    Raises:
        FinalizeMismatch: a prediction differs where the gated model has no tie (see
            :data:`TIE_MARGIN`), or the parameter counts differ.
    """
    top2 = gated.topk(min(2, gated.shape[-1]), dim=-1).values
    tie = (top2[:, 0] - top2[:, -1]) <= TIE_MARGIN
    differ = gated.argmax(-1) != finalized.argmax(-1)
    diff = (gated - finalized).abs().max().item()
    if bool((differ & ~tie).any()):
        raise FinalizeMismatch(f"the finalized model predicts {int((differ & ~tie).sum())} held-out examples "
                               f"differently from the gated model (max logit difference {diff:.3g}); "
                               "expected the same predictions")
    if parameters != finalized_parameters:
        raise FinalizeMismatch(f"the finalized model has {finalized_parameters} parameters; the gates reported "
                               f"{parameters}; expected them equal")
    return {"finalized_accuracy": accuracy_of(finalized, data), "finalize_max_logit_diff": diff}


def _inputs(data: EncodedTexts, pad_id: int) -> list[dict[str, Tensor]]:
    count = min(len(data), THROUGHPUT_BATCH_SIZE * THROUGHPUT_BATCHES)
    out = []
    for batch in batches(data, list(range(count)), THROUGHPUT_BATCH_SIZE, pad_id):
        batch.pop("labels")
        out.append(batch)
    return out


def timed_pass(model: nn.Module, inputs: list[dict[str, Tensor]]) -> float:
    """Seconds ``model`` takes over ``inputs`` (its batches, in order, once)."""
    started = time.perf_counter()
    for batch in inputs:
        model(**batch)
    return time.perf_counter() - started


@torch.inference_mode()
def measure_throughput(models: dict[str, tuple[nn.Module, Callable[[], ContextManager]]], data: EncodedTexts,
                       pad_id: int) -> dict[str, float]:
    """Examples per second of each model (see the module docstring for the protocol).

    Args:
        models: name -> (model, context): the model is timed inside ``context()`` (say,
            ``handle.detached`` for the dense reference; ``contextlib.nullcontext`` otherwise).
        data: held-out examples (the first 128 are used).

    Returns:
        name -> examples per second (fastest pass).
    """
    inputs = _inputs(data, pad_id)
    examples = sum(len(batch["input_ids"]) for batch in inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(THROUGHPUT_THREADS)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model, _ in models.values():
            model.eval()
        for repeat in range(WARMUP_PASSES + TIMED_PASSES):
            for name, (model, context) in models.items():
                with context():
                    seconds = timed_pass(model, inputs)
                if repeat >= WARMUP_PASSES:
                    times[name].append(seconds)
    finally:
        torch.set_num_threads(threads)
    return {name: examples / min(values) for name, values in times.items()}


def finalize_and_measure(handle, model: nn.Module, test: EncodedTexts, pad_id: int, gated_logits: Tensor,
                         parameters: int) -> dict:
    """Finalize a gated run's model, check it (:func:`check_finalized`) and time it against the
    dense model; returns the metrics to record (``speedup``: finalized over dense examples/s)."""
    small = handle.finalize()
    finalized_parameters = sum(p.numel() for p in small.parameters())
    metrics = check_finalized(gated_logits, logits_of(small, test, pad_id), test, parameters=parameters,
                              finalized_parameters=finalized_parameters)
    speed = measure_throughput({"dense": (model, handle.detached), "finalized": (small, contextlib.nullcontext)},
                               test, pad_id)
    return {**metrics, "finalized_parameters": finalized_parameters,
            **_speed_metrics(speed["finalized"], speed["dense"])}


def measure_dense(model: nn.Module, test: EncodedTexts, pad_id: int) -> dict:
    """Throughput of a dense run's model (its speed-up over dense is 1 by definition)."""
    speed = measure_throughput({"dense": (model, contextlib.nullcontext)}, test, pad_id)["dense"]
    return _speed_metrics(speed, speed)


def _speed_metrics(examples_per_second: float, dense_examples_per_second: float) -> dict:
    return {"speedup": examples_per_second / dense_examples_per_second,
            "throughput": {"examples_per_second": round(examples_per_second, 1),
                           "dense_examples_per_second": round(dense_examples_per_second, 1),
                           "batch_size": THROUGHPUT_BATCH_SIZE, "threads": THROUGHPUT_THREADS,
                           "timed_passes": TIMED_PASSES}}
