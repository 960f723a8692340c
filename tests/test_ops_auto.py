"""backend="auto": the cost-model choice (choose_backend) — fast paths, sparse masks with gradients,
never a refusing backend, registry-order fallbacks — and auto's output against the reference
(three-way bound as in test_ops_attention)."""

import zlib

import pytest
import torch
from test_ops_attention import KINDS, check_three_way, make_inputs, make_mask, run

from learnmask.masks import attention as am
from learnmask.ops import attention as ops
from learnmask.ops import cost_model
from learnmask.ops.attention import BackendNotSupported, choose_backend, masked_attention
from learnmask.ops.reference import ReferenceBackend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def qkv(b=2, h=4, s=256, d=16, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=gen).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_plain_causal_or_no_mask_goes_to_sdpa(mask, grad):
    q, k, v = qkv(grad=grad)
    with torch.set_grad_enabled(grad):
        choice = choose_backend(q, k, v, mask=None if mask is None else am.causal())
    assert choice.name == "sdpa" and choice.ranking[0] == "sdpa"
    assert ("no mask" if mask is None else "is_causal") in choice.reason
    assert "sdpa" not in choice.refused


def test_sparse_window_with_gradients_goes_to_blocks():
    q, k, v = qkv(h=8, s=1024, d=64)  # the benchmark's head sizes (only the choice is computed)
    choice = choose_backend(q, k, v, mask=am.sliding_window(64))
    assert choice.name == "blocks", choice.reason
    assert "flex" in choice.refused  # no backward on CPU
    assert choice.estimates["blocks"] < choice.estimates["sdpa"] < choice.estimates["reference"]
    assert "plan keeps" in choice.reason and "forward+backward" in choice.reason
    # the same with a token gate that needs a gradient (the recomputing backward)
    z = torch.rand(2, 1024).requires_grad_()
    assert choose_backend(q, k, v, mask=am.sliding_window(64), token_gate=z).name == "blocks"


def test_cold_flex_is_not_chosen_and_warm_flex_is_ranked_by_its_estimate(monkeypatch):
    monkeypatch.setattr(cost_model, "_FLEX_WARM", set())
    q, k, v = qkv(s=512, grad=False)  # float32, no gradient, no dropout, K % 16 == 0: flex takes it on CPU
    mask = am.sliding_window(64)
    assert ops.backend_reasons(q, k, v, mask=mask)["flex"] == []
    cold = choose_backend(q, k, v, mask=mask)
    assert "flex" in cold.ranking and cold.name != "flex"
    assert cold.estimates["flex"] > cost_model._FLEX_COMPILE_S  # cold: the compile time is counted
    assert cold.ranking[-1] == "flex"  # behind even the float64 reference
    cost_model._FLEX_WARM.add(cost_model.flex_key(ops.prepare_inputs(q, k, v, mask=mask)))
    warm = choose_backend(q, k, v, mask=mask)
    assert warm.estimates["flex"] < cost_model._FLEX_COMPILE_S
    assert warm.ranking == sorted(warm.ranking, key=warm.estimates.__getitem__)
    assert warm.ranking.index("flex") < cold.ranking.index("flex")
    # warm and (made) cheapest: chosen
    monkeypatch.setattr(cost_model, "_R_FLEX", 1e15)
    monkeypatch.setattr(cost_model, "_C_FLEX_CALL", 0.0)
    assert choose_backend(q, k, v, mask=mask).name == "flex"


def test_choice_is_deterministic_and_lists_every_accepting_backend():
    q, k, v = qkv(s=300)
    real = torch.arange(300)[None, :] < torch.tensor([[120], [300]])
    mask = am.causal() & am.padding(real)
    first, second = choose_backend(q, k, v, mask=mask), choose_backend(q, k, v, mask=mask)
    assert first == second
    assert sorted(first.ranking + list(first.refused)) == sorted(ops.auto_order())
    assert first.ranking[-1] == "reference"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_auto_never_picks_a_refusing_backend(kind, grad):
    gen = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    q, k, v = qkv(b=2, h=2, s=40, d=8, grad=grad)
    mask = make_mask(kind, 2, 40, 40, gen)
    with torch.set_grad_enabled(grad):
        choice = choose_backend(q, k, v, mask=mask)
        reasons = ops.backend_reasons(q, k, v, mask=mask)
    assert reasons[choice.name] == []
    assert all(reasons[name] == [] for name in choice.ranking)
    assert set(choice.refused) == {name for name, r in reasons.items() if r}


def test_non_cpu_devices_keep_registry_order(monkeypatch):
    q, k, v = qkv(s=64)
    inputs = ops.prepare_inputs(q, k, v, mask=am.sliding_window(8))
    fake_q = torch.empty(2, 4, 64, 16, device="meta")
    meta = ops.AttentionInputs(q=fake_q, k=fake_q, v=fake_q, mask=inputs.mask, structure=inputs.structure,
                               head_gate=None, token_gate=None, scale=1.0)
    choice = ops._choose(meta)
    assert choice.ranking == [n for n in ops.auto_order() if n not in choice.refused]
    assert "registry order" in choice.reason


def test_unestimated_backend_keeps_its_registry_place(monkeypatch):
    monkeypatch.setattr(ops, "_REGISTRY", dict(ops._REGISTRY))
    monkeypatch.setattr(ops, "_ORDER", list(ops._ORDER))

    class Mine:  # no estimate_seconds, and not a built-in backend class: no cost model
        name = "mine"

        def not_supported_reasons(self, inputs):
            return []

        def __call__(self, inputs):
            return ReferenceBackend("input")(inputs)

    class Cheap(Mine):
        name = "cheap"

        def estimate_seconds(self, inputs):
            return 0.0

    ops.register_backend(Mine(), before="blocks")
    q, k, v = qkv(s=512)
    choice = choose_backend(q, k, v, mask=am.sliding_window(32))
    assert choice.ranking.index("mine") == choice.ranking.index("blocks") - 1
    ops.register_backend(Cheap(), before=None)
    assert choose_backend(q, k, v, mask=am.sliding_window(32)).name == "cheap"


def test_every_backend_refusing_raises():
    q = torch.randn(1, 1, 4, 4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "_REGISTRY", {name: _Refusing(name) for name in ops._REGISTRY})
        patch.setattr(ops, "_ORDER", [name for name in ops._ORDER if name != "triton"])
        with pytest.raises(BackendNotSupported, match="no masked-attention backend"):
            choose_backend(q, q, q)
        with pytest.raises(BackendNotSupported, match="never"):
            masked_attention(q, q, q)


class _Refusing:
    def __init__(self, name):
        self.name = name

    def not_supported_reasons(self, inputs):
        return ["never"]

    def __call__(self, inputs):
        raise AssertionError


SHAPES = [(2, 4, 2, 37, 37, 16), (2, 2, 1, 19, 45, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_auto_matches_reference_three_way(kind, dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("auto", kind, dtype, shape)).encode()))
    gated = kind not in ("none", "dense")
    tensors, gates, w = make_inputs(shape, dtype, gated, gen)
    mask = make_mask(kind, shape[0], shape[3], shape[4], gen)
    golden_out, golden_grads = run(ReferenceBackend(), tensors, gates, mask, torch.float64, w)
    ref_out, ref_grads = run(ReferenceBackend("input"), tensors, gates, mask, dtype, w)
    out, grads = run("auto", tensors, gates, mask, dtype, w)
    check_three_way(golden_out, ref_out, out, dtype, "out", "auto")
    for name, g0, g1, g2 in zip(["q", "k", "v"] + list(gates), golden_grads, ref_grads, grads):
        check_three_way(g0, g1, g2, dtype, f"d{name}", "auto")
    with torch.no_grad():  # inference: flex may be eligible; auto still matches
        out_ng, _ = run("auto", tensors, gates, mask, dtype, w, grads=False)
    check_three_way(golden_out, ref_out, out_ng, dtype, "out", "auto (no grad)")


def test_auto_output_equals_the_chosen_backend():
    q, k, v = qkv(s=200)
    for mask in (None, am.causal(), am.sliding_window(16), am.document(torch.arange(200).div(50).long()[None])):
        name = choose_backend(q, k, v, mask=mask).name
        assert masked_attention(q, k, v, mask=mask).equal(masked_attention(q, k, v, mask=mask, backend=name))
