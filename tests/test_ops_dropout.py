"""masked_attention's dropout_p (SDPA's semantics: each attention probability zeroed with probability p,
the rest scaled by 1 / (1 - p)): the mean and the variance over many draws on every backend that takes
it, seeded repeatability, gradients, p = 0 unchanged, refusals and validation."""

import math

import pytest
import torch

from learnmask.masks import attention as am
from learnmask.ops import attention as ops
from learnmask.ops.attention import BackendNotSupported, masked_attention
from learnmask.ops.blocks import BlocksBackend

BACKENDS = {"reference": "reference", "sdpa": "sdpa", "blocks": BlocksBackend(block_q=8)}
DRAWS, B, H, Q, K, D = 300, 2, 2, 12, 16, 4


def _masks(batch):
    real = torch.ones(batch, K, dtype=torch.bool)
    real[1::2, 10:] = False
    docs = torch.arange(K).div(6, rounding_mode="floor").expand(batch, K)
    keep = torch.ones(Q, K, dtype=torch.bool).tril(3)
    keep[4] = False  # a fully masked row
    return {
        "window&padding": am.sliding_window(5) & am.padding(real),
        "documents&causal": am.document(docs[:, :Q], docs) & am.causal(),
        "user": am.from_mod(lambda b, h, q, k: (q - k).abs() <= 3, per_batch=False),
        "dense": keep,
    }


@pytest.mark.parametrize("kind", list(_masks(1)))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mean_and_variance_over_draws_are_the_dropout_of_the_probabilities(backend, kind):
    p = 0.3
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Q, K, K))
    mask = _masks(B)[kind]
    reference = masked_attention(q, k, v, mask=mask, backend="reference")
    keep = mask if isinstance(mask, torch.Tensor) else mask.keep(B, H, Q, K)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = weights @ v
    torch.testing.assert_close(reference, expected)
    variance = p / (1 - p) * (weights.square() @ v.square()) / DRAWS  # of the mean of DRAWS outputs
    dtype = torch.float64 if backend == "reference" else torch.float32
    # DRAWS independent draws at once: the batch repeated (dropout is drawn per element)
    many = [t.to(dtype).repeat(DRAWS, 1, 1, 1) for t in (q, k, v)]
    mask_many = _masks(B * DRAWS)[kind]
    torch.manual_seed(1)
    with torch.no_grad():
        out = masked_attention(*many, mask=mask_many, backend=BACKENDS[backend], dropout_p=p)
    mean = out.double().view(DRAWS, B, H, Q, D).mean(0)
    live = variance > 0
    assert (mean[~live] == 0).all()  # rows with no key: exactly 0 under dropout too
    ratio = ((mean - expected).square()[live] / variance[live]).mean().item()
    assert 0.6 < ratio < 1.5, ratio  # unbiased (the 1 / (1 - p) scale) with the variance of dropout at p
    assert not out.view(DRAWS, B, H, Q, D)[0].equal(out.view(DRAWS, B, H, Q, D)[1])


@pytest.mark.parametrize("backend", list(BACKENDS) + ["auto"])
def test_seeded_calls_repeat_and_gradients_flow(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, requires_grad=True) for n in (Q, K, K))
    z = torch.rand(B, K, generator=gen).requires_grad_()
    g = torch.rand(H, generator=gen).requires_grad_()
    mask = _masks(B)["window&padding"] & am.padding(torch.tensor([[True] * K, [False] * K]))  # batch row 1: no key
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(masked_attention(q, k, v, mask=mask, token_gate=z, head_gate=g,
                                     backend=BACKENDS.get(backend, backend), dropout_p=0.2))
    assert outs[0].equal(outs[1]) and not outs[0].equal(outs[2])
    assert (outs[0][1] == 0).all()
    grads = torch.autograd.grad(outs[0].square().sum(), (q, k, v, z, g))
    for name, grad in zip("qkvzg", grads):
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert (grads[0][1] == 0).all()


@pytest.mark.parametrize("backend", list(BACKENDS) + ["auto"])
def test_p_zero_is_bit_identical_to_no_dropout(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, requires_grad=True) for n in (Q, K, K))
    for mask in _masks(B).values():
        chosen = BACKENDS.get(backend, backend)
        plain = masked_attention(q, k, v, mask=mask, backend=chosen)
        assert masked_attention(q, k, v, mask=mask, backend=chosen, dropout_p=0.0).equal(plain)
        assert masked_attention(q, k, v, mask=mask, backend=chosen, dropout_p=0).equal(plain)


def test_backends_without_dropout_refuse_and_auto_skips_them():
    q = torch.randn(1, 2, 8, 8)
    reasons = ops.backend_reasons(q, q, q, mask=am.causal(), dropout_p=0.1)
    assert any("dropout" in r for r in reasons["flex"]) and any("dropout" in r for r in reasons["triton"])
    assert reasons["sdpa"] == [] and reasons["blocks"] == [] and reasons["reference"] == []
    assert not any("dropout" in r for r in ops.backend_reasons(q, q, q, mask=am.causal())["flex"])
    with torch.no_grad():
        choice = ops.choose_backend(q, q, q, mask=am.sliding_window(2), dropout_p=0.1)
        assert choice.name in ("sdpa", "blocks") and "flex" in choice.refused and "flex" not in choice.ranking
        torch.manual_seed(0)
        dropped = masked_attention(q, q, q, mask=am.sliding_window(2), dropout_p=0.5)
    assert not dropped.equal(masked_attention(q, q, q, mask=am.sliding_window(2)))
    with pytest.raises(BackendNotSupported, match="dropout"):
        masked_attention(q, q, q, mask=am.causal(), backend="flex", dropout_p=0.1)


@pytest.mark.parametrize("bad, error", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                        (True, TypeError), ("0.1", TypeError), (torch.tensor(0.1), TypeError)])
def test_dropout_p_is_validated(bad, error):
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(error, match=r"dropout_p must be a float in \[0, 1\)"):
        masked_attention(q, q, q, dropout_p=bad)
