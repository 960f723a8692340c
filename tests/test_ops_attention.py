"""masked_attention: three-way accuracy of every CPU backend (float64 golden, reference in the test
dtype, fast backend), forward and backward; cases A1 and A3; fully masked rows; backend choice and
refusals; bad inputs."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from learnmask.masks import attention as am
from learnmask.ops import attention as ops
from learnmask.ops.attention import BackendNotSupported, masked_attention
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.flex import BackendUnavailable, FlexBackend
from learnmask.ops.reference import ReferenceBackend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager flex

FLEX_EAGER = FlexBackend(compile=False)
FAST = {"sdpa": "sdpa", "blocks": BlocksBackend(block_q=16), "flex": FLEX_EAGER}
# err(fast) <= FUDGE * max(err(reference in dtype), FLOOR[dtype] * mean |golden|), errors as mean |x - golden|;
# the floor is about one unit in the last place of the dtype, relative to the tensor's size.
FUDGE = {"out": 2.0, "grad": 4.0}
FLOOR = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# (B, Hq, Hkv, Q, K, D): Q == K, Q != K with odd lengths, grouped heads
SHAPES = [(2, 4, 2, 37, 37, 16), (2, 2, 1, 19, 45, 8), (1, 4, 4, 70, 33, 16)]


def make_mask(kind, b, q_len, kv_len, gen):
    real = torch.ones(b, kv_len, dtype=torch.bool)
    real[-1, kv_len * 2 // 3:] = False  # last row: a third is padding
    q_docs = torch.arange(q_len).div(7, rounding_mode="floor").expand(b, q_len)
    kv_docs = torch.arange(kv_len).div(7, rounding_mode="floor").expand(b, kv_len)
    if kind == "none":
        return None
    if kind == "causal":
        return am.causal()
    if kind == "window":
        return am.sliding_window(6)
    if kind == "padding":
        return am.padding(real)
    if kind == "causal&padding":
        return am.causal() & am.padding(real)
    if kind == "document":
        return am.document(q_docs, kv_docs) & am.causal()
    if kind == "prefix":
        return am.prefix_lm(torch.tensor([5, 0][:b]))
    if kind == "chunked":
        return am.chunked(8)
    if kind == "user|":
        return am.from_mod(lambda bb, h, q, k: (q - k).abs() <= h + 1) | am.sliding_window(2)
    if kind == "dense":
        return torch.rand(b, 1, q_len, kv_len, generator=gen) > 0.3
    if kind == "bias":
        keep = torch.rand(1, 1, q_len, kv_len, generator=gen) > 0.3
        return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    raise ValueError(kind)


KINDS = ["none", "causal", "window", "padding", "causal&padding", "document", "prefix", "chunked", "user|", "dense",
         "bias"]


def make_inputs(shape, dtype, gated, gen):
    b, hq, hkv, q_len, kv_len, d = shape
    q = torch.randn(b, hq, q_len, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, kv_len, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, kv_len, d, generator=gen, dtype=torch.float64)
    gates = {}
    if gated:
        z = torch.rand(b, kv_len, generator=gen, dtype=torch.float64)
        z[:, ::5] = 0.0  # removed keys
        gates = {"token_gate": z, "head_gate": torch.rand(hq, generator=gen, dtype=torch.float64)}
    w = torch.randn(b, hq, q_len, d, generator=gen, dtype=torch.float64)  # loss weights
    return (q, k, v), gates, w


def run(backend, tensors, gates, mask, dtype, w, grads=True):
    leaves = [t.detach().to(dtype).clone().requires_grad_(grads) for t in tensors]
    gate_leaves = {n: g.detach().to(dtype).clone().requires_grad_(grads) for n, g in gates.items()}
    with torch.set_grad_enabled(grads):
        out = masked_attention(*leaves, mask=mask, backend=backend, **gate_leaves)
    if not grads:
        return out.double(), []
    loss = (out.double() * w).sum()
    params = leaves + list(gate_leaves.values())
    return out.double(), [g.double() for g in torch.autograd.grad(loss, params)]


def mean_err(a, b):
    return (a - b).abs().mean().item()


def check_three_way(golden, ref, fast, dtype, what, name):
    assert torch.isfinite(fast).all(), f"{what}: {name} is not finite"
    err_ref, err_fast = mean_err(ref, golden), mean_err(fast, golden)
    floor = FLOOR[dtype] * golden.abs().mean().item()
    bound = FUDGE["out" if what == "out" else "grad"] * max(err_ref, floor)
    assert err_fast <= bound, f"{what}: err({name}) = {err_fast:.3g} > {bound:.3g} (err(reference) = {err_ref:.3g})"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_three_way_forward_and_backward(kind, dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, dtype, shape)).encode()))
    # gates with gradients take the recomputing backward; without gates (the last shape, and the plain
    # kinds) the blocks backend runs PyTorch's fused CPU flash backward per group
    gated = kind not in ("none", "dense") and shape != SHAPES[-1]
    tensors, gates, w = make_inputs(shape, dtype, gated, gen)
    mask = make_mask(kind, shape[0], shape[3], shape[4], gen)
    golden_out, golden_grads = run(ReferenceBackend(), tensors, gates, mask, torch.float64, w)
    ref_out, ref_grads = run(ReferenceBackend("input"), tensors, gates, mask, dtype, w)
    names = ["q", "k", "v"] + list(gates)
    for name, backend in FAST.items():
        if name == "flex" and kind in ("dense", "bias"):
            continue  # flex takes AttentionMasks, not dense tensors
        with_grads = name != "flex"  # FlexAttention has no backward on CPU
        out, grads = run(backend, tensors, gates, mask, dtype, w, grads=with_grads)
        check_three_way(golden_out, ref_out, out, dtype, "out", name)
        for grad_name, g, gg, rg in zip(names, grads, golden_grads, ref_grads):
            check_three_way(gg, rg, g, dtype, f"d{grad_name}", name)


# -- A1: a fully masked query row ------------------------------------------------------------------

def a1_inputs():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 8, generator=gen)
    k, v = torch.randn(1, 2, 10, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    keep = torch.ones(6, 10, dtype=torch.bool).tril()
    keep[5] = False
    return q, k, v, keep


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocks", "flex", "auto"])
def test_a1_fully_masked_row(backend):
    q, k, v, keep = a1_inputs()
    forms = [keep, torch.zeros(6, 10).masked_fill(~keep, float("-inf")),
             torch.zeros(6, 10).masked_fill(~keep, torch.finfo(torch.float32).min)]
    chosen = FLEX_EAGER if backend == "flex" else backend
    outs = []
    for mask in forms:
        if backend == "flex":
            structured = am.from_mod(lambda b, h, qi, ki: (ki <= qi) & (qi != 5), per_batch=False, per_head=False)
            with torch.no_grad():
                outs.append(masked_attention(q, k, v, mask=structured, backend=chosen))
            continue
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = masked_attention(*leaves, mask=mask, backend=chosen)
        grads = torch.autograd.grad(out.sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][..., 5, :] == 0).all()
        outs.append(out.detach())
    for out in outs:
        assert (out[..., 5, :] == 0).all()
        assert out.equal(outs[0])
    golden = masked_attention(q.double(), k.double(), v.double(), mask=keep, backend="reference")
    torch.testing.assert_close(outs[0].double(), golden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocks"])
def test_fully_masked_rows_by_mask_or_gate_in_every_dtype(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 9, 8, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=gen, dtype=dtype, requires_grad=True)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1] = False  # batch row 1 has no real key at all
    z = torch.rand(2, 9, generator=gen, dtype=dtype)
    z[0, :3] = 0  # causal rows 0..2 of batch row 0 keep only gated-out keys
    z.requires_grad_()
    out = masked_attention(q, k, v, mask=am.causal() & am.padding(real), token_gate=z,
                           backend=BlocksBackend(4) if backend == "blocks" else backend)
    assert (out[1] == 0).all() and (out[0, :, :3] == 0).all()
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().square().sum() + out.float().sum(), (q, k, v, z))
    assert all(torch.isfinite(g).all() for g in grads)


# -- A3: boolean polarity -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocks", "auto"])
def test_a3_tril_keep_mask_is_causal(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 4, 16, generator=gen) for _ in range(3))
    out = masked_attention(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool).tril(), backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if backend in ("sdpa", "blocks"):
        assert out.equal(expected)
    else:
        torch.testing.assert_close(out, expected)
    assert out[:, :, 0].equal(v[:, :, 0])
    torch.testing.assert_close(masked_attention(q, k, v, mask=am.causal(), backend=backend), expected)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocks"])
def test_a3_ignore_style_masks_give_identical_output_once_converted(backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(3))
    key_padding_mask = torch.tensor([[False, False, False, True, True], [False] * 5])  # True = ignore
    outs = [
        masked_attention(q, k, v, mask=am.from_key_padding_mask(key_padding_mask), backend=backend),
        masked_attention(q, k, v, mask=am.padding(~key_padding_mask), backend=backend),
        masked_attention(q, k, v, mask=~key_padding_mask[:, None, None, :], backend=backend),
        masked_attention(q, k, v, mask=am.padding((~key_padding_mask).long()), backend=backend),
    ]
    for out in outs[1:]:
        assert out.equal(outs[0])
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, bias=False)
    x = torch.randn(2, 5, 16, generator=gen)
    expected, _ = mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    heads = [(x @ w.T).view(2, 5, 2, 8).transpose(1, 2) for w in (w_q, w_k, w_v)]
    out = masked_attention(*heads, mask=am.from_key_padding_mask(key_padding_mask), backend=backend)
    torch.testing.assert_close(mha.out_proj(out.transpose(1, 2).reshape(2, 5, 16)), expected)


# -- gates and grouped heads ---------------------------------------------------------------------

def test_gates_are_the_documented_math():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    z = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    g = torch.tensor([1.0, 0.25], dtype=torch.float64)
    out = masked_attention(q, k, v, token_gate=z, head_gate=g, backend="reference")
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2 + z.log()[:, None, None, :], dim=-1)
    torch.testing.assert_close(out, (weights @ v) * g.view(1, 2, 1, 1))
    ones = masked_attention(q, k, v, token_gate=torch.ones(1, 3, dtype=torch.float64), backend="reference")
    torch.testing.assert_close(ones, masked_attention(q, k, v, backend="reference"))


def test_grouped_query_heads_read_their_kv_head():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 5, 8, generator=gen)
    k, v = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    expanded = [t.repeat_interleave(2, dim=1) for t in (k, v)]
    for backend in ("reference", "sdpa", "blocks"):
        torch.testing.assert_close(masked_attention(q, k, v, mask=am.causal() & am.sliding_window(2), backend=backend),
                                   masked_attention(q, *expanded, mask=am.causal() & am.sliding_window(2),
                                                    backend="reference"))


# -- backend choice ----------------------------------------------------------------------------

def test_named_backend_raises_with_its_reasons_and_auto_falls_back():
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(BackendNotSupported, match="flex.*no backward on cpu"):
        masked_attention(q, q, q, mask=am.causal(), backend="flex")
    with pytest.raises(BackendNotSupported, match="dense tensor"):
        masked_attention(q, q, q, mask=torch.ones(8, 8, dtype=torch.bool), backend=FLEX_EAGER)
    reasons = ops.backend_reasons(q, q, q, mask=am.causal())
    assert reasons["flex"] and reasons["blocks"] == [] and reasons["reference"] == []
    assert list(reasons) == ops.auto_order()
    out = masked_attention(q, q, q, mask=am.causal())
    torch.testing.assert_close(out, masked_attention(q, q, q, mask=am.causal(), backend="reference"))
    with pytest.raises(ValueError, match="unknown backend"):
        masked_attention(q, q, q, backend="nope")


class _Refusing:
    name = "refusing"

    def not_supported_reasons(self, inputs):
        return ["it never runs"]

    def __call__(self, inputs):
        raise AssertionError("not called")


class _FailingAtRunTime:
    name = "failing"

    def not_supported_reasons(self, inputs):
        return []

    def __call__(self, inputs):
        raise BackendUnavailable("compilation failed (simulated)")


def test_registry_order_runtime_failures_and_lazy_import_failures(monkeypatch):
    monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))
    monkeypatch.setattr(ops, "_ORDER", ["failing", "refusing", "triton", "reference"])
    monkeypatch.setattr(ops, "_LAZY", {"triton": ("learnmask.ops.no_such_module", "TritonBackend")})
    monkeypatch.setattr(ops, "_LAZY_FAILURES", {})
    monkeypatch.delitem(ops._REGISTRY, "triton", raising=False)
    ops._REGISTRY.update(failing=_FailingAtRunTime(), refusing=_Refusing())
    q = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(masked_attention(q, q, q), masked_attention(q, q, q, backend="reference"))
    reasons = ops.backend_reasons(q, q, q)
    assert reasons["refusing"] == ["it never runs"] and "no_such_module" in reasons["triton"][0]
    with pytest.raises(BackendNotSupported, match="simulated"):
        masked_attention(q, q, q, backend="failing")
    with pytest.raises(BackendNotSupported, match="no_such_module"):
        masked_attention(q, q, q, backend="triton")
    ops.register_backend(ReferenceBackendNamed(), before="refusing")
    assert ops.auto_order().index("ref2") == ops.auto_order().index("refusing") - 1
    with pytest.raises(ValueError, match="already registered"):
        ops.register_backend(ReferenceBackendNamed())
    with pytest.raises(TypeError):
        ops.register_backend(object())


class ReferenceBackendNamed(ReferenceBackend):
    name = "ref2"


def test_flex_compile_unavailable_is_a_reason(monkeypatch):
    from learnmask.ops import flex

    monkeypatch.setattr(flex, "_compile_reasons", lambda device: ("no C++ compiler (simulated)",))
    q = torch.randn(1, 1, 4, 4)
    reasons = ops.backend_reasons(q, q, q, mask=am.causal())
    assert "no C++ compiler (simulated)" in reasons["flex"]
    with torch.no_grad():
        torch.testing.assert_close(masked_attention(q, q, q, mask=am.causal()),
                                   masked_attention(q, q, q, mask=am.causal(), backend="reference"))


def test_triton_backend_is_found_lazily_or_reported():
    q = torch.randn(1, 1, 4, 4)
    reasons = ops.backend_reasons(q, q, q, mask=am.causal())["triton"]
    assert reasons and all(isinstance(r, str) for r in reasons)  # on CPU without the interpreter it refuses


@pytest.mark.slow
def test_compiled_flex_forward_matches_reference():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=gen) for _ in range(3))
    z = torch.rand(2, 150, generator=gen)
    mask = am.causal() & am.sliding_window(40) & am.padding(torch.arange(150).expand(2, 150) < 130)
    with torch.no_grad():
        out = masked_attention(q, k, v, mask=mask, token_gate=z, backend="flex")
        expected = masked_attention(q, k, v, mask=mask, token_gate=z, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- bad inputs --------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    cases = [
        (dict(q=q[0]), ValueError, r"q has shape \(4, 5, 8\); expected 4 dims"),
        (dict(k=k[:, :, :5]), ValueError, r"must agree in \(B, Hkv, K\)"),
        (dict(q=torch.randn(2, 3, 5, 8)), ValueError, "multiple of key/value heads"),
        (dict(q=torch.randn(2, 4, 5, 4)), ValueError, "head dim"),
        (dict(q=torch.randn(3, 4, 5, 8)), ValueError, "batch"),
        (dict(q=q.half()), TypeError, "share one dtype"),
        (dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "dtype"),
        (dict(mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, r"mask has shape \(5, 5\)"),
        (dict(mask=torch.ones(5, 6, dtype=torch.long)), TypeError, "bool keep-mask"),
        (dict(mask=torch.ones(5, 6, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
        (dict(mask=torch.full((5, 6), -1.0)), ValueError, "score biases"),
        (dict(mask=am.padding(torch.ones(2, 5))), ValueError, "attention_mask has shape"),
        (dict(mask=am.padding(torch.ones(2, 6, dtype=torch.bool, device="meta"))), ValueError, "mask.to"),
        (dict(mask=am.causal().block_mask(1, 1, 5, 6)), TypeError, "BlockMask"),
        (dict(mask="causal"), TypeError, "AttentionMask"),
        (dict(token_gate=torch.rand(2, 5)), ValueError, r"token_gate has shape \(2, 5\)"),
        (dict(token_gate=torch.full((2, 6), 1.5)), ValueError, r"\[0, 1\]"),
        (dict(token_gate=torch.ones(2, 6, dtype=torch.long)), TypeError, "floating"),
        (dict(head_gate=torch.rand(3)), ValueError, "head_gate has shape"),
        (dict(head_gate=torch.rand(4, device="meta")), ValueError, "head_gate is on meta"),
        (dict(scale=float("nan")), TypeError, "scale"),
    ]
    for change, error, message in cases:
        args = dict(q=q, k=k, v=v, mask=None, token_gate=None, head_gate=None, scale=None) | change
        with pytest.raises(error, match=message):
            masked_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_scale_default_and_override():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    default = masked_attention(q, k, v, backend="reference")
    explicit = masked_attention(q, k, v, scale=1 / math.sqrt(4), backend="reference")
    assert default.equal(explicit)
    assert not masked_attention(q, k, v, scale=1.0, backend="reference").allclose(default)


def test_block_paths_never_allocate_a_b_h_s_s_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    b, h, s, d = 2, 4, 512, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    z = torch.rand(b, s, requires_grad=True)
    docs = torch.arange(s).div(64, rounding_mode="floor").expand(b, s)
    for mask in (am.causal() & am.sliding_window(16), am.document(docs), am.causal() & am.padding(docs < 6)):
        with LargestOutput():
            out = masked_attention(q, k, v, mask=mask, token_gate=z, backend="blocks")
            torch.autograd.grad(out.sum(), (q, k, v, z))
        assert LargestOutput.largest <= b * h * s * s // 4, (mask, LargestOutput.largest)
        LargestOutput.largest = 0


@pytest.mark.parametrize("kind", ["window", "document", "causal&padding", "prefix", "chunked"])
def test_flex_block_masks_with_small_blocks_and_tails_match_reference(kind):
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 45, 8, generator=gen) for _ in range(3))
    mask = make_mask(kind, 2, 45, 45, gen)
    with torch.no_grad():
        out = masked_attention(q, k, v, mask=mask, backend=FlexBackend(compile=False, block_size=16))
    torch.testing.assert_close(out, masked_attention(q, k, v, mask=mask, backend="reference"))
