"""What every masked-attention backend receives and must answer.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, grouped-query attention),
Q query length, K key length, D head dim, Dv value head dim.

Semantics every backend reproduces (the ``reference`` backend is the spec, in float64):

    scores[b, h, i, j] = scale * <q[b, h, i], k[b, h // (Hq // Hkv), j]>
    a pair (i, j) is *kept* where the mask keeps it (keep-mask convention: True = attend)
    token_gate z[b, j] in [0, 1]: z == 0 removes key j; z > 0 adds log(z) to its score
    P[b, h, i] = softmax over kept j of scores                     (zeros if no key is kept)
    dropout_p p in [0, 1): each P[b, h, i, j] is zeroed with probability p, the rest scaled by
        1 / (1 - p) (``scaled_dot_product_attention``'s ``dropout_p``; Srivastava et al., 2014)
    out[b, h, i] = P[b, h, i] @ v
    head_gate g (Hq,) or (B, Hq): out[b, h] *= g[(b,) h]

A fully masked query row gives exactly zeros and finite gradients (with dropout too). A key removed
from a row cannot affect it, even where its k or v is NaN or infinite; a row keeping such a key is
NaN (enforced by ``masked_attention`` for every backend: :mod:`learnmask.ops.nonfinite`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from learnmask.masks.structure import MaskStructure


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Validated inputs of one ``masked_attention`` call.

    ``mask`` is what the user passed after validation: None, a boolean keep-mask tensor
    broadcastable to (B, Hq, Q, K), or a ``learnmask.masks.attention`` mask object.
    ``structure`` is the mask as a :class:`MaskStructure` when it has one (None for user
    predicates and dense tensors). ``keep`` is filled lazily by backends that need a dense mask.
    """

    q: Tensor  # (B, Hq, Q, D)
    k: Tensor  # (B, Hkv, K, D)
    v: Tensor  # (B, Hkv, K, Dv)
    mask: Any
    structure: MaskStructure | None
    head_gate: Tensor | None  # (Hq,) or (B, Hq), values in [0, 1] (any real value is allowed)
    token_gate: Tensor | None  # (B, K), values in [0, 1]
    scale: float
    dropout_p: float = 0.0  # probability of zeroing an attention probability, in [0, 1)


@runtime_checkable
class AttentionBackend(Protocol):
    """A way to compute masked attention. Backends never raise on inputs they cannot take from
    ``not_supported_reasons``; they return the reasons, and ``masked_attention`` decides."""

    name: str

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Empty when this backend can compute ``inputs``; else one sentence per reason."""
        ...

    def __call__(self, inputs: AttentionInputs) -> Tensor:
        """Output of shape (B, Hq, Q, Dv) in the dtype of q."""
        ...
