"""The thread policy of the ``blocks`` backend on CPU: a plan's group calls run in two lanes, two
worker threads that each make their calls on torch's intra-op threads, instead of one after another
in the calling thread.

Why (issue 11): a plan's calls are small (a causal window of 128 keys at S = 2048 is 32 calls of
64 × 191 pairs) and each holds several OpenMP parallel regions (the kernel, its zeroed buffers, the
copies in and out): about 70 regions in a forward and 350 in a forward+backward, where dense SDPA
has 2 and 8. A region ends at a barrier, and libgomp's waiting threads spin there for about 10 ms
(``GOMP_SPINCOUNT``'s default) before they sleep. On cores shared with another busy process, the OS
parks one thread of a region at times and its partner spins away the core the parked thread needs:
on 2 cores beside a second 2-thread torch job, ``blocks`` ran 3-8x slower than alone, dense SDPA
2x (its fair share). In two lanes, a lane whose call waits for a parked thread leaves the cores to
the other lane's call, and while one lane is in Python (slicing, masks) the other computes.

A side effect, process-wide: with the lanes' threads there are more OpenMP threads than cores, and
libgomp then waits at every barrier with a short spin and sleeps (its documented behaviour when
threads outnumber CPUs), also in regions that are not ours. Measured on 2 cores: 0-5% slower for
small-op workloads on an idle machine (a futex wake-up per region), dense SDPA unchanged, and
far less lost where another process shares the cores.

Determinism: the calls are cut into :data:`LANES` runs of consecutive calls of about equal cost
(:func:`split`) whether they run in lanes or inline, and callers keep one accumulator per run and
add them in run order, so results repeat bit for bit either way.

The runs go inline (in the calling thread, one after another) where :func:`inline_reason` gives a
reason: tensors not on the CPU, one intra-op thread, a call from a lane, too little work to hand
over, or thread-local state the lanes would not share (the profiler, which records the calling
thread only; autocast; torch function or dispatch modes; compilation).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["LANES", "MIN_PARALLEL_MACS", "inline_reason", "lanes", "run", "split"]

T = TypeVar("T")

LANES = 2  # worker threads, each with the caller's intra-op thread count
# Multiply-adds below which a plan runs inline: handing calls to the lanes costs some 0.1 ms.
MIN_PARALLEL_MACS = 2**24

_local = threading.local()
_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def inline_reason(macs: float, device: torch.device) -> str | None:
    """Why a plan of ``macs`` multiply-adds on ``device`` runs inline in the calling thread (None: it
    runs in the lanes)."""
    if device.type != "cpu":
        return f"tensors on {device.type} (kernels there are asynchronous already)"
    if torch.get_num_threads() < 2:
        return "torch uses one intra-op thread"
    if getattr(_local, "lane", False):
        return "called from a lane"
    if macs < MIN_PARALLEL_MACS:
        return f"too little work ({macs:.3g} multiply-adds < {MIN_PARALLEL_MACS:.3g})"
    if torch.autograd._profiler_enabled():
        return "the profiler is recording (it sees the calling thread only)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on (thread-local)"
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return "a torch function or dispatch mode is active (thread-local)"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    return None


def lanes(macs: float, device: torch.device) -> bool:
    """Whether a plan of ``macs`` multiply-adds on ``device`` runs in the lanes (see :func:`inline_reason`)."""
    return inline_reason(macs, device) is None


def split(costs: Sequence[float], parts: int = LANES) -> list[list[int]]:
    """Indices 0..n-1 cut into at most ``parts`` runs of consecutive indices of about equal total
    cost (index i goes to the run its cost's midpoint falls in); never an empty run."""
    total = float(sum(costs))
    if parts <= 1 or len(costs) <= 1 or total <= 0:
        return [list(range(len(costs)))] if len(costs) else []
    out: list[list[int]] = [[] for _ in range(parts)]
    done = 0.0
    for i, cost in enumerate(costs):
        out[min(parts - 1, int((done + cost / 2) / total * parts))].append(i)
        done += cost
    return [part for part in out if part]


def run(jobs: Sequence[Callable[[], T]], in_lanes: bool = True) -> list[T]:
    """The results of ``jobs`` (at most :data:`LANES`), job i in lane i with the caller's grad and
    inference modes, or one after another in the calling thread when ``in_lanes`` is False or there
    is one job. Re-raises the first job's error, after every job has ended."""
    if not in_lanes or len(jobs) <= 1:
        return [job() for job in jobs]
    if len(jobs) > LANES:
        raise ValueError(f"{len(jobs)} jobs for {LANES} lanes")
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_mode(job: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return job()
        return call

    pool = _pool(torch.get_num_threads())
    futures = [pool.submit(i, in_mode(job)) for i, job in enumerate(jobs)]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]


class _Pool:
    """:data:`LANES` daemon threads with ``threads`` intra-op threads each; a job goes to the lane named."""

    def __init__(self, threads: int) -> None:
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(LANES)]
        ready = threading.Barrier(LANES + 1)
        for i, jobs in enumerate(self._queues):
            threading.Thread(target=_serve, args=(jobs, ready, threads), name=f"learnmask-lane-{i}",
                             daemon=True).start()
        ready.wait()

    def submit(self, lane: int, job: Callable[[], T]) -> Future:
        future: Future = Future()
        self._queues[lane].put((job, future))
        return future


def _serve(jobs: queue.SimpleQueue, ready: threading.Barrier, threads: int) -> None:
    _local.lane = True
    # a new thread starts with torch's default count (the caller's, unless the caller set its own)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # also the default of threads started later: the caller's count
    ready.wait()
    while True:
        job, future = jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(job())
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)


def _pool(threads: int) -> _Pool:
    with _pools_lock:
        if threads not in _pools:  # one pair of lanes per intra-op thread count in use (idle lanes sleep)
            _pools[threads] = _Pool(threads)
        return _pools[threads]


def _forget_pools() -> None:
    """In a forked child the lanes' threads do not exist: start afresh."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
