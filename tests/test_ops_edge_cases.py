"""The op's contract at the edges (issue 12, items 8 and 10), on every CPU backend: a backend refuses
up front with its reasons, or answers correctly; a query with no key gives zeros; a masked-out key
cannot affect a row whatever k and v hold there; a compile failure refuses only its own inputs.
(The triton backend's cases are in test_triton_backend.py, which runs it in Triton's interpreter.)"""

import pytest
import torch

from learnmask.masks import attention as am
from learnmask.ops import flex as flex_module
from learnmask.ops.attention import BackendNotSupported, backend_reasons, masked_attention
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.flex import BackendUnavailable, FlexBackend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BACKENDS = {"reference": "reference", "sdpa": "sdpa", "blocks": BlocksBackend(block_q=4),
            "flex": FlexBackend(compile=False), "auto": "auto"}


def _mask(kind, batch, q_len, kv_len):
    if kind == "none":
        return None
    if kind == "causal":
        return am.causal()
    if kind == "padding":
        return am.padding(torch.ones(batch, kv_len, dtype=torch.bool))
    if kind == "window&documents":
        return am.sliding_window(2) & am.document(torch.zeros(batch, q_len, dtype=torch.long),
                                                  torch.zeros(batch, kv_len, dtype=torch.long))
    if kind == "user":
        return am.from_mod(lambda b, h, q, k: q >= k)
    if kind == "dense":
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    raise ValueError(kind)


KINDS = ["none", "causal", "padding", "window&documents", "user", "dense"]


def _answer_or_reasons(backend, q, k, v, **kwargs):
    """The output, or None when the backend refused up front (then its reasons must name the input)."""
    try:
        return masked_attention(q, k, v, backend=BACKENDS[backend], **kwargs)
    except BackendNotSupported as error:
        assert backend not in ("reference", "sdpa", "blocks", "auto"), f"{backend} refused: {error}"
        return None


# -- empty, single-element and float64 inputs (item 10) -------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("q_len, kv_len", [(5, 0), (0, 5), (0, 0)], ids=["K=0", "Q=0", "Q=K=0"])
def test_empty_sequences_give_zeros_and_zero_gradients(backend, kind, q_len, kv_len):
    q = torch.randn(2, 4, q_len, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, kv_len, 8, requires_grad=True) for _ in range(2))
    z = torch.rand(2, kv_len, requires_grad=True)
    out = _answer_or_reasons(backend, q, k, v, mask=_mask(kind, 2, q_len, kv_len), token_gate=z,
                             head_gate=torch.rand(4))
    if out is None:
        assert any("empty" in r for r in backend_reasons(q, k, v, mask=_mask(kind, 2, q_len, kv_len))[backend])
        return
    assert out.shape == (2, 4, q_len, 8) and (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, z))
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_single_element_inputs(backend, kind):
    q, k, v = (torch.randn(1, 1, 1, 1, dtype=torch.float64) for _ in range(3))
    mask = _mask(kind, 1, 1, 1)
    out = _answer_or_reasons(backend, q.float(), k.float(), v.float(), mask=mask)
    if out is not None:
        torch.testing.assert_close(out, v.float())  # one key, kept: softmax weight 1
    gated = _answer_or_reasons(backend, q.float(), k.float(), v.float(), mask=mask, token_gate=torch.zeros(1, 1))
    if gated is not None:
        assert (gated == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_float64_inputs_answer_in_float64_or_are_refused(backend, kind):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = _mask(kind, 2, 9, 9)
    with torch.no_grad():
        out = _answer_or_reasons(backend, q, k, v, mask=mask)
    if out is not None:
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, masked_attention(q, k, v, mask=mask, backend="reference"))


def test_compiled_flex_refuses_float64_up_front_and_a_compile_failure_refuses_only_its_inputs(monkeypatch):
    q = torch.randn(1, 1, 16, 8)
    flex = FlexBackend(compile=True)
    with torch.no_grad():
        with pytest.raises(BackendNotSupported, match="not float64"):
            masked_attention(q.double(), q.double(), q.double(), mask=am.causal(), backend=flex)

        def compile_that_fails_on_float16():
            def run(q, k, v, **kwargs):
                if q.dtype == torch.float16:
                    raise RuntimeError("simulated lowering failure")
                return flex_module._flex_module().flex_attention(q, k, v, **kwargs)
            return run

        monkeypatch.setattr(flex_module, "compiled_flex_attention", compile_that_fails_on_float16)
        monkeypatch.setattr(flex_module, "_compile_reasons", lambda device: ())
        with pytest.raises(BackendNotSupported, match="simulated lowering failure"):
            masked_attention(q.half(), q.half(), q.half(), mask=am.causal(), backend=flex)
        assert any("simulated" in r for r in flex.not_supported_reasons(_inputs(q.half())))
        # the failure is remembered for those inputs only: float32 (and other shapes) still run
        assert flex.not_supported_reasons(_inputs(q)) == []
        out = masked_attention(q, q, q, mask=am.causal(), backend=flex)
        torch.testing.assert_close(out, masked_attention(q, q, q, mask=am.causal(), backend="reference"))
        with pytest.raises(BackendUnavailable):
            flex(_inputs(q.half()))


def _inputs(q):
    from learnmask.ops.inputs import prepare_inputs
    return prepare_inputs(q, q, q, mask=am.causal())


# -- non-finite keys and values (item 8) ----------------------------------------------------------

def _poisoned_case(kind, where, value):
    """q, k, v (B=2, H=2, Q=K=8, D=4) with ``value`` in key 6's k or v; the keep-mask (2, 1, 8, 8) of the
    mask; and the mask / gate arguments that remove key 6 from some rows."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=gen) for _ in range(3))
    (k if where == "k" else v)[:, :, 6, 1] = value
    args = {}
    if kind == "padding":
        real = torch.ones(2, 8, dtype=torch.bool)
        real[0, 6:] = False  # batch row 0: key 6 is padding
        args["mask"] = am.padding(real)
        keep = real[:, None, None, :].expand(2, 1, 8, 8)
    elif kind == "causal":
        args["mask"] = am.causal()
        keep = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8)
    elif kind == "window":
        args["mask"] = am.sliding_window(3) & am.padding(torch.ones(2, 8, dtype=torch.bool))
        keep = args["mask"].keep(2, 1, 8, 8)
    elif kind == "dense":
        keep = torch.rand(2, 1, 8, 8, generator=gen) > 0.4
        args["mask"] = keep
    elif kind == "gate":
        z = torch.rand(2, 8, generator=gen)
        z[0, 6] = 0.0  # batch row 0: key 6 gated out
        args["token_gate"] = z
        keep = (z > 0)[:, None, None, :].expand(2, 1, 8, 8)
    return q, k, v, args, keep


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("kind", ["padding", "causal", "window", "dense", "gate"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_masked_out_key_cannot_affect_a_row_whatever_it_holds(backend, kind, where, value):
    q, k, v, args, keep = _poisoned_case(kind, where, value)
    if backend == "flex" and kind == "dense":
        pytest.skip("flex takes AttentionMasks, not dense tensors")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads_needed = backend != "flex"  # FlexAttention has no backward on CPU
    with torch.set_grad_enabled(grads_needed):
        out = masked_attention(*leaves, backend=BACKENDS[backend], **args)
    clean_k, clean_v = k.nan_to_num(0.5, 0.5, 0.5), v.nan_to_num(0.5, 0.5, 0.5)
    expected = masked_attention(q.double(), clean_k.double(), clean_v.double(), backend="reference", **args).float()
    keeps_bad = keep[..., 6].expand(2, 2, 8)  # (B, H, Q): rows that keep key 6
    unaffected = ~keeps_bad
    assert unaffected.any() and keeps_bad.any()
    torch.testing.assert_close(out[unaffected], expected[unaffected], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[keeps_bad]).all()  # a kept non-finite key: the row is NaN
    if grads_needed:
        grads = torch.autograd.grad((out[unaffected]).sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads)


def test_the_check_finds_bad_keys_and_ignores_finite_values_whose_sum_overflows():
    from learnmask.ops.inputs import prepare_inputs
    from learnmask.ops.nonfinite import non_finite_keys

    k = torch.full((1, 2, 4, 2), 3e38)  # finite, but the check's float32 sum overflows
    assert non_finite_keys(prepare_inputs(k, k, k)) is None
    v = k.clone()
    v[0, 1, 2, 0] = float("-inf")
    assert non_finite_keys(prepare_inputs(k, k, v)).tolist() == [[[False] * 4, [False, False, True, False]]]
