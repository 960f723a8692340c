"""Where the random draws of a training step come from: a generator that depends only on the
run, the step and the stream, so that every DDP rank draws the same gate samples, a resumed run
draws what the uninterrupted one did, and a 2-process run draws what a 1-process run does.

The shared loop (:mod:`learnmask.recipe.loop`) opens :func:`step_sampling` around each step;
learnmask's samplers called without a ``generator`` take theirs from :func:`generator_for`
(torch's global generator outside such a block, as before). Two streams:

* ``"shared"`` — draws whose shapes do not depend on the data (unit gates of heads, FFN units,
  hidden dimensions and blocks, diff masks, Child-Tuning-F's Bernoulli masks): seeded by
  ``(seed, step)`` alone, hence identical on every rank;
* ``"per_example"`` — draws shaped by the batch (token gates' noise): the rank and the
  micro-batch are folded in, since each holds other examples; a consumer that draws them never
  shifts the shared stream.

With gradient accumulation every micro-batch of a step opens the step anew: the shared stream
gives each micro-batch the same gate samples, as one forward of the whole batch would.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator

import torch

#: The streams of a step (see the module's docstring).
STREAMS = ("shared", "per_example")

_ACTIVE: contextvars.ContextVar[StepSampling | None] = contextvars.ContextVar("learnmask_step_sampling", default=None)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (their ``str``), stable across processes and Python runs
    (unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepSampling:
    """The generators of one step: one per ``(device, stream)``, made on first use.

    Args:
        seed: the run's seed or key (any value with a stable ``str``).
        step: the optimizer step, >= 0.
        rank: this process's rank; micro: the micro-batch within the step (both folded into the
            ``"per_example"`` stream only).
    """

    def __init__(self, seed: object, step: int, rank: int = 0, micro: int = 0) -> None:
        self.seed, self.step, self.rank, self.micro = seed, int(step), int(rank), int(micro)
        self._generators: dict[tuple[str, str], torch.Generator] = {}

    def generator(self, device: torch.device | str = "cpu", stream: str = "shared") -> torch.Generator:
        """The step's generator for ``stream`` on ``device``.

        Raises:
            ValueError: an unknown stream.
        """
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {list(STREAMS)}; got {stream!r}")
        device = torch.device(device)
        key = (str(device), stream)
        if key not in self._generators:
            parts = (self.seed, self.step, stream) + ((self.rank, self.micro) if stream == "per_example" else ())
            self._generators[key] = torch.Generator(device=device).manual_seed(derive_seed(*parts))
        return self._generators[key]


@contextlib.contextmanager
def step_sampling(seed: object, step: int, rank: int = 0, micro: int = 0) -> Iterator[StepSampling]:
    """Inside the block, learnmask's samplers called without a generator draw from the step's
    generators (see the module's docstring and :class:`StepSampling`)."""
    token = open_step(seed, step, rank, micro)
    try:
        yield _ACTIVE.get()
    finally:
        close_step(token)


def open_step(seed: object, step: int, rank: int = 0, micro: int = 0) -> contextvars.Token:
    """Start drawing from the step's generators until :func:`close_step` (for loops that are not
    one Python block, such as a Hugging Face ``Trainer``'s callbacks); returns the token to close."""
    return _ACTIVE.set(StepSampling(seed, step, rank, micro))


def close_step(token: contextvars.Token) -> None:
    """End what :func:`open_step` started (back to what was active before it)."""
    _ACTIVE.reset(token)


def generator_for(device: torch.device | str, stream: str = "shared") -> torch.Generator | None:
    """The active step's generator for ``stream`` on ``device``; None (torch's global
    generator) outside :func:`step_sampling`."""
    active = _ACTIVE.get()
    return None if active is None else active.generator(device, stream)
