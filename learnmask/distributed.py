"""PyTorch's own distributed engine for learnmask's runs: the process group that ``torchrun``
describes, and the few collectives that keep masks identical on every rank.

Under ``torchrun --nproc-per-node N -m learnmask run config.toml`` every rank trains the same
run: the shared loop (:mod:`learnmask.recipe.loop`) wraps the model in
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA), gives each rank its slice of every
global batch, and lets rank 0 alone write checkpoints, TensorBoard and results. What keeps the
masks identical across ranks:

* gate samples come from a generator seeded by ``(run, step)`` (:mod:`learnmask.sampling`),
  the same on every rank; the token gates' per-example noise folds in the rank;
* controllers step on values averaged over ranks (:func:`mean`), so multipliers, integral terms
  and loss-adaptive levels agree;
* importance and Fisher scores are averaged over ranks (:func:`mean_`) before any threshold;
* a closed gate multiplies by zero and never skips a module, so DDP runs with
  ``find_unused_parameters=False``.

Every function here is a no-op (or the identity) outside an initialized process group of more
than one rank, so single-process code calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: Process-group backends learnmask starts, and the devices each one serves.
BACKENDS = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",)}
#: How long a rank waits at a collective: rank 0 alone evaluates, times and records a run
#: while the others wait, which can take long on CPU.
TIMEOUT = datetime.timedelta(hours=3)


def active() -> bool:
    """Whether this process is one rank of an initialized process group of two or more."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """Ranks in the process group (1 outside one)."""
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several
    (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def check_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` if it can serve tensors on ``device``.

    Raises:
        ValueError: an unknown backend, or one that cannot serve the device (NCCL on CPU, or
            on a machine without CUDA), naming what would.
    """
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {sorted(BACKENDS)}; got {backend!r}")
    kind = torch.device(device).type
    if kind not in BACKENDS[backend]:
        fits = [name for name, kinds in BACKENDS.items() if kind in kinds]
        serves = ", ".join(BACKENDS[backend])
        raise ValueError(f"the {backend} backend cannot run a model on {kind}: it serves {serves} tensors; use "
                         f"{' or '.join(fits) or 'another device'} for a {kind} model")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the {backend} backend was asked for CUDA tensors, but this machine has no CUDA device; "
                         "use gloo on cpu")
    return backend


def default_backend(device: torch.device | str) -> str:
    """NCCL for a CUDA device, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_environment(backend: str | None = None, *, device: torch.device | str = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` in the environment); nothing when there is none.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; None: :func:`default_backend` of ``device``.
        device: where the run's model lives (``"cpu"`` for learnmask's recipes).

    Returns:
        whether this process is now one of several ranks.

    Raises:
        ValueError: a backend that cannot serve ``device`` (see :func:`check_backend`), or a
            process group already initialized with another backend.
    """
    if not launched():
        if backend is not None:
            check_backend(backend, device)
        return False
    backend = check_backend(backend or default_backend(device), device)
    if torch.distributed.is_initialized():
        running = torch.distributed.get_backend()
        if running != backend:
            raise ValueError(f"a {running} process group is already initialized; this run asks for {backend}")
        return active()
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    logger.info("rank %d of %d (%s)", rank(), world_size(), backend)
    return active()


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if active():
        torch.distributed.barrier()


def end(*, wait: bool = True) -> None:
    """Destroy the process group, if any. ``wait``: first wait for every rank (after work that
    finished; not on an error path, where a dead rank would hang the rest). A rank that tore gloo
    down while a peer might still talk to it died at exit with SIGABRT ("terminate called without
    an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def mean(value: float) -> float:
    """``value`` averaged over ranks (the identity in one process): the same float on every rank.

    A non-finite value on any rank makes the mean non-finite, so a controller that skips
    non-finite inputs skips on every rank.
    """
    if not active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place (float64 sum, then back to its dtype) and return it;
    afterwards every rank holds the same values. The identity in one process."""
    if not active():
        return tensor
    total = tensor.detach().to(_collective_device(), torch.float64)
    torch.distributed.all_reduce(total)
    tensor.copy_((total / world_size()).to(tensor.device, tensor.dtype))
    return tensor


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself in one process)."""
    if not active():
        return bool(flag)
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return bool(tensor.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; ``obj`` itself in one process)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


class RankFailed(RuntimeError):
    """Another rank raised in a step that :func:`on_main` ran on rank 0 alone."""


def on_main(function, *args, **kwargs) -> Any:
    """``function(*args, **kwargs)`` run on rank 0 alone (evaluating, timing, writing files), its
    result broadcast to every rank; in one process simply the call.

    Raises:
        whatever ``function`` raised, on rank 0; :class:`RankFailed` naming it on the others
        (so that no rank waits at a collective for a rank that failed).
    """
    if not active():
        return function(*args, **kwargs)
    outcome, error = None, None
    if rank() == 0:
        try:
            outcome = ("ok", function(*args, **kwargs))
        except BaseException as raised:  # noqa: BLE001 -- re-raised below, after the others hear of it
            error = raised
            outcome = ("error", f"{type(raised).__name__}: {raised}")
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise RankFailed(f"rank 0 failed, so rank {rank()} stops too: {outcome[1]}")
    return outcome[1]


@contextlib.contextmanager
def exclusive(path) -> Iterator[None]:
    """:func:`learnmask.io.exclusive` on ``path`` held by rank 0 for the whole group (the other
    ranks take no lock: they follow rank 0's decisions, e.g. ``broadcast_object(not
    path.exists())``, and would deadlock waiting for a lock that rank 0 holds while it waits for
    them at a collective)."""
    from learnmask.io import exclusive as lock

    with lock(path) if is_main() else contextlib.nullcontext():
        yield


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s in place and return it (no-op in one process)."""
    if not active():
        return tensor
    moved = tensor.detach().to(_collective_device())
    torch.distributed.broadcast(moved, src=src)
    if moved is not tensor:
        tensor.copy_(moved.to(tensor.device))
    return tensor


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- batches -------------------------------------------------------------------------------


def check_divisible(batch_size: int, world: int | None = None, *, what: str = "batch_size") -> None:
    """Refuse a global batch that the ranks cannot split evenly.

    Raises:
        ValueError: ``batch_size`` not a multiple of the world size, naming both and the nearest
            sizes that would do.
    """
    world = world_size() if world is None else world
    if batch_size % world:
        lower = batch_size - batch_size % world
        options = ", ".join(str(n) for n in (lower, lower + world) if n > 0)
        raise ValueError(f"{what} {batch_size} is the global batch, split evenly across {world} ranks, and {world} "
                         f"does not divide it: use {options}, or run with a world size that divides {batch_size}")


def batch_size_of(batch: Any) -> int:
    """Examples in ``batch``: the leading size of its first tensor (a tensor, a mapping or a
    sequence of them, nested)."""
    for tensor in _tensors(batch):
        return int(tensor.shape[0])
    raise TypeError(f"a batch must hold at least one tensor with a leading batch dimension; got {type(batch).__name__}")


def shard(batch: Any, part: int, parts: int) -> tuple[Any, float]:
    """Rank ``part``'s slice of a global batch, and the weight that makes the ranks' mean of the
    per-rank mean losses equal the global batch's mean loss.

    The examples ``[start, end)`` of contiguous, near-equal slices (sizes differ by at most one
    when ``parts`` does not divide the batch, as in a last, short batch of an epoch); the weight
    is ``local_size * parts / global_size`` (1 for even slices). Every tensor of the batch (a
    tensor, a mapping or a sequence of them, nested) is sliced along dim 0; anything else is kept
    whole.

    Raises:
        ValueError: fewer examples than ranks (a rank would get none), or tensors whose leading
            sizes differ.
    """
    total = batch_size_of(batch)
    sizes = {int(t.shape[0]) for t in _tensors(batch)}
    if len(sizes) > 1:
        raise ValueError(f"the tensors of a batch must share their leading (batch) size to be split across ranks; "
                         f"got sizes {sorted(sizes)}")
    if total < parts:
        raise ValueError(f"a batch of {total} example(s) cannot be split across {parts} ranks (each needs at least "
                         "one); make the last batch at least the world size, or drop it")
    start, end = total * part // parts, total * (part + 1) // parts
    return _slice(batch, start, end), (end - start) * parts / total


def split(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut into ``parts`` contiguous near-equal micro-batches (fewer when it holds fewer
    examples; see :func:`shard`); ``[batch]`` for one part."""
    if parts == 1:
        return [batch]
    parts = min(parts, batch_size_of(batch))
    return [shard(batch, index, parts)[0] for index in range(parts)]


def _tensors(batch: Any):
    if isinstance(batch, Tensor):
        if batch.dim() > 0:
            yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        for value in batch:
            yield from _tensors(value)


def _slice(batch: Any, start: int, end: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:end] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {key: _slice(value, start, end) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_slice(value, start, end) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(value, start, end) for value in batch)
    return batch
