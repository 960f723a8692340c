"""Runs of a ``blocks`` plan's pieces that one fused call computes: pieces of equal shape whose
queries and keys advance by fixed steps — the band of a sliding window (64 × 191 rectangles, one
every 64 rows), packed documents of equal length, the pieces of one group cut by rows — read
through strided views of q, k, v (no copy; the key views of a band overlap).

Why (issue 11): each call costs a fixed time and OpenMP parallel regions, and on cores shared with
another process every region can wait for a descheduled thread (see :mod:`learnmask.ops.cpu_pool`).
A window's forward at S = 2048 is 32 calls; as runs it is 4. Only the forward takes runs: one
backward call over a run was measured slower than its pieces' calls (quiet, 2 cores: 30 vs 21 ms for
a window's 15-piece run; the members' key gradients, 12 MB, leave the cache before they are added).

The view of a run of n pieces over batch rows [b0, b1) is (n, b·H, length, D) — the run's members
become the kernel's batch and the batch rows its heads — so batch rows merge with heads only where
the tensor lays them out as one dimension (``stride(0) == H · stride(1)``, e.g. contiguous
(B, H, S, D)); otherwise a run of more than one batch row is computed piece by piece.

Legend: n pieces of a run, b = b1 - b0 batch rows, H heads (Hq or Hkv), R query rows and L keys
of each piece, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from learnmask.ops.row_plan import KVGroup

__all__ = ["Run", "runs", "view"]


@dataclass(frozen=True)
class Run:
    """Pieces ``indices`` (in a lane's part, in order); member i is ``first`` moved by ``i · q_step``
    query rows and ``i · k_step`` keys."""

    indices: tuple[int, ...]
    first: KVGroup
    q_step: int
    k_step: int

    @property
    def n(self) -> int:
        return len(self.indices)

    def member(self, i: int) -> KVGroup:
        g, dq, dk = self.first, i * self.q_step, i * self.k_step
        return KVGroup(g.b0, g.b1, g.q0 + dq, g.q1 + dq, g.k0 + dk, g.k1 + dk, g.full)


def runs(pieces: list[KVGroup], part: list[int]) -> list[Run]:
    """``part``'s pieces (indices into ``pieces``, in order) gathered into runs: a piece joins the
    last run of its shape (batch rows, query rows, keys, ``full``) when it lies one step further
    (the second member sets the step; queries never overlap, keys never go back), else starts one.
    Pieces of two shapes that alternate (a causal staircase inside equal documents) make two runs.
    Runs are listed by their first piece."""
    out: list[Run] = []
    last: dict[tuple, int] = {}  # shape -> index in out of the last run of that shape
    for i in part:
        g = pieces[i]
        shape = (g.b0, g.b1, g.q1 - g.q0, g.k1 - g.k0, g.full)
        j = last.get(shape)
        if j is not None:
            r, f = out[j], out[j].first
            if r.n == 1 and g.q0 >= f.q1 and g.k0 >= f.k0:
                out[j] = Run((*r.indices, i), f, g.q0 - f.q0, g.k0 - f.k0)
                continue
            if r.n > 1 and (g.q0, g.k0) == (f.q0 + r.n * r.q_step, f.k0 + r.n * r.k_step):
                out[j] = Run((*r.indices, i), f, r.q_step, r.k_step)
                continue
        last[shape] = len(out)
        out.append(Run((i,), g, 0, 0))
    return out


def view(x: Tensor, run: Run, start: int, step: int, length: int) -> Tensor | None:
    """(n, b·H, length, D) view of ``x[b0:b1, :, start + i·step : start + i·step + length]`` for each
    member i, or None when x's batch rows and heads cannot merge into one dimension."""
    xb = x[run.first.b0:run.first.b1]
    b, h, _, d = xb.shape
    sb, sh, ss, sd = xb.stride()
    if b > 1 and sb != h * sh:
        return None
    return xb.as_strided((run.n, b * h, length, d), (step * ss, sh, ss, sd), xb.storage_offset() + start * ss)
