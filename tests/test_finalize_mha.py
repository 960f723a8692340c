"""Heads of nn.MultiheadAttention physically removed: the rebuilt block computes exactly what the
stock block computes with the other heads' output columns zeroed, for every constructor option
and every mask a caller may pass; it is gated, finalized and saved again like any block."""
import copy
import dataclasses
import io
import itertools

import pytest
import torch
from torch import nn

from learnmask.export import finalize
from learnmask.export.mha import prune_heads
from learnmask.gates import FixedGate
from learnmask.inject import apply_head_gates, apply_masks
from learnmask.inject.architectures import find_layers, is_pruned_attention
from learnmask.stats import layer_report

E, H, D = 24, 4, 6
KEEP = torch.tensor([0, 2, 3])


def _stock(seed=0, **options) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **options).eval()
    with torch.no_grad():
        for p in mha.parameters():  # non-zero biases everywhere, so a dropped bias shows
            p.add_(torch.randn_like(p) * 0.1)
    return mha


def _closed_zeroed(mha: nn.MultiheadAttention, keep: torch.Tensor) -> nn.MultiheadAttention:
    """The stock block with the output columns of the closed heads zeroed (the gated model)."""
    zeroed = copy.deepcopy(mha)
    column = torch.zeros(H)
    column[keep] = 1.0
    with torch.no_grad():
        zeroed.out_proj.weight.mul_(column.repeat_interleave(D))
    return zeroed


def _inputs(batch_first: bool, kdim: int = E, vdim: int = E, L: int = 5, S: int = 7, N: int = 2):
    g = torch.Generator().manual_seed(3)
    shape = (lambda n, w: (N, n, w)) if batch_first else (lambda n, w: (n, N, w))
    return (torch.randn(shape(L, E), generator=g), torch.randn(shape(S, kdim), generator=g),
            torch.randn(shape(S, vdim), generator=g))


OPTIONS = [dict(batch_first=b, bias=bias, add_bias_kv=kv, add_zero_attn=zero)
           for b, bias, kv, zero in itertools.product([True, False], [True, False], [False, True], [False, True])]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
def test_pruned_block_equals_stock_with_closed_heads_zeroed(options):
    mha = _stock(**options)
    expected_block, pruned = _closed_zeroed(mha, KEEP), prune_heads(mha, KEEP)
    q, k, v = _inputs(options["batch_first"])
    N, S = 2, 7
    S_kv = S + int(options["add_bias_kv"]) + int(options["add_zero_attn"])
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1, 4:] = True
    causal = torch.triu(torch.ones(5, S, dtype=torch.bool), 1)
    calls = [dict(), dict(key_padding_mask=padding), dict(attn_mask=causal),
             dict(attn_mask=causal, key_padding_mask=padding),
             dict(attn_mask=torch.zeros(5, S).masked_fill(causal, float("-inf")), key_padding_mask=padding),
             dict(attn_mask=causal, is_causal=False, need_weights=False)]
    with torch.no_grad():
        for kwargs in calls:
            out, weights = pruned(q, k, v, average_attn_weights=False, **kwargs)
            ref, ref_weights = expected_block(q, k, v, average_attn_weights=False, **kwargs)
            assert out.shape == ref.shape
            assert (out - ref).abs().max().item() <= 1e-6, kwargs
            if "need_weights" not in kwargs:  # per-head weights: those of the kept heads
                assert weights.shape == (N, len(KEEP), 5, S_kv)
                assert (weights - ref_weights[:, KEEP]).abs().max().item() <= 1e-6


def test_cross_attention_with_other_key_and_value_widths_and_unbatched_input():
    mha = _stock(kdim=10, vdim=14, batch_first=True)
    expected_block, pruned = _closed_zeroed(mha, KEEP), prune_heads(mha, KEEP)
    q, k, v = _inputs(True, kdim=10, vdim=14)
    assert pruned.k_proj.weight.shape == (len(KEEP) * D, 10) and pruned.v_proj.weight.shape == (len(KEEP) * D, 14)
    with torch.no_grad():
        assert (pruned(q, k, v)[0] - expected_block(q, k, v)[0]).abs().max().item() <= 1e-6
        unbatched = pruned(q[0], k[0], v[0])[0]
        assert unbatched.shape == (5, E)
        assert (unbatched - expected_block(q[0], k[0], v[0])[0]).abs().max().item() <= 1e-6


def test_pruning_a_pruned_block_again_and_training_through_it():
    mha = _stock(batch_first=True)
    once = prune_heads(mha, KEEP)
    twice = prune_heads(once, torch.tensor([1, 2]))  # heads 2 and 3 of the original
    q, k, v = _inputs(True)
    with torch.no_grad():
        expected = _closed_zeroed(mha, torch.tensor([2, 3]))(q, k, v)[0]
        assert (twice(q, k, v)[0] - expected).abs().max().item() <= 1e-6
    twice.train()
    twice(q, k, v)[0].square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in twice.parameters())
    assert not twice.q_identity.requires_grad and "q_identity" not in dict(twice.named_parameters())


def test_bad_head_indices_are_clear_errors():
    mha = _stock()
    for heads in (torch.tensor([], dtype=torch.long), torch.tensor([0, 4]), torch.tensor([2, 1]),
                  torch.tensor([1, 1])):
        with pytest.raises(ValueError, match=r"heads must be increasing indices in \[0, 4\)"):
            prune_heads(mha, heads)


def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_finalized_encoder_with_masks_equals_gated_and_is_smaller():
    model = _encoder()
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(mask)})
    x = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    plain = finalize(handle)
    with torch.no_grad():
        for kwargs in (dict(), dict(src_key_padding_mask=padding), dict(mask=causal, is_causal=True),
                       dict(mask=causal, src_key_padding_mask=padding)):
            assert (plain(x, **kwargs) - model(x, **kwargs)).abs().max().item() <= 1e-5, kwargs
    assert [layer.self_attn.num_heads for layer in plain.layers] == [2, 3]
    assert plain.layers[0].self_attn.q_proj.weight.shape == (2 * D, E)
    assert sum(p.numel() for p in plain.parameters()) == handle.remaining_parameters()
    assert not plain.layers[0].self_attn._qkv_same_embed_dim  # the encoder's fused fast path is off


def test_finalized_encoder_is_gated_and_finalized_again():
    model = _encoder()
    first = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 0]]))})
    plain = finalize(first)
    x = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = plain(x)
    open_gates = apply_masks(plain, heads=True, ffn=True, gate_options={"init_log_alpha": 5.0})
    assert open_gates.gates["heads"].shape == (2, 3)
    with torch.no_grad():
        assert (plain(x) - before).abs().max().item() <= 1e-6  # all-open gates: the same model
    open_gates.remove()
    second = apply_masks(plain, heads=True, gates={"heads": FixedGate(torch.tensor([[0.0, 1, 1], [1, 0, 0]]))})
    with torch.no_grad():
        gated = plain(x)
    again = finalize(second)
    assert [layer.self_attn.num_heads for layer in again.layers] == [2, 1]
    with torch.no_grad():
        assert (again(x) - gated).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in again.parameters()) == second.remaining_parameters()


def test_a_bare_multihead_attention_model_is_returned_rebuilt_and_reloads():
    mha = _stock(batch_first=True)
    handle = apply_masks(mha, heads=True, gates={"heads": FixedGate(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))})
    q, k, v = _inputs(True)
    with torch.no_grad():
        gated = mha(q, k, v)[0]
    plain = finalize(handle)
    assert is_pruned_attention(plain) and plain.num_heads == 2
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_pruned_attention(loaded)  # recognised by its parts after pickling
    with torch.no_grad():
        assert (loaded(q, k, v)[0] - gated).abs().max().item() <= 1e-5
        assert torch.equal(copy.deepcopy(loaded)(q, k, v)[0], loaded(q, k, v)[0])
    assert find_layers(loaded)[0].attention.num_heads == 2


def test_flops_count_the_query_identity():
    model = _encoder()
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]]))})
    gated, plain = layer_report(handle, seq_len=10), layer_report(finalize(handle), seq_len=10)
    ignoring_heads_total = [dataclasses.replace(r, heads_total=0) for r in gated]
    assert ignoring_heads_total == [dataclasses.replace(r, heads_total=0) for r in plain]
    dense = layer_report(_encoder(), seq_len=10)
    projections = 2 * 10 * E * 4 * 3 * D  # q, k, v, out for 3 heads
    attention = 4 * 10 * 10 * 3 * D
    assert plain[0].flops_attention == projections + attention + 2 * 10 * (3 * D) ** 2
    assert plain[1].flops_attention == dense[1].flops_attention  # all heads kept: the stock block stays


def test_apply_head_gates_refuses_the_out_proj_of_a_pruned_block():
    plain = prune_heads(_stock(), KEEP)
    holder = nn.Module()
    holder.attn = plain
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_head_gates(holder, "hard_concrete", target_modules=["attn.out_proj"], num_heads=3)


def test_deepcopy_and_reload_keep_what_the_encoder_reads():
    """fx keeps only what a graph reads; the attributes nn.TransformerEncoder reads from its
    self_attn (batch_first, num_heads, ...) must survive copies of emptied and pruned blocks."""
    model = _encoder()
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.tensor([[0.0, 0, 0, 0], [1, 0, 1, 1]]))})
    plain = finalize(handle)
    x = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = model(x)
        for copied in (copy.deepcopy(plain), torch.load(buffer, weights_only=False)):
            assert (copied(x) - expected).abs().max().item() <= 1e-5
            assert copied.layers[0].self_attn.batch_first and copied.layers[1].self_attn.num_heads == 3
    assert type(plain.layers[0].self_attn).__name__ == "RemovedAttention"


@pytest.mark.parametrize("make", [lambda: _stock(bias=False, batch_first=True),
                                  lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(
                                      E, H, 32, dropout=0.0, batch_first=True, bias=False), 1,
                                      enable_nested_tensor=False).eval()])
def test_a_bias_free_block_is_finalized_twice(make):
    """fx keeps only the tensors a graph reads, so a bias-free pruned block's projections have no
    ``bias`` attribute at all; pruning it again must not need one."""
    model = make()
    first = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0, 1, 1]]))})
    once = finalize(first)
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(0))
    run = (lambda m: m(x, x, x)[0]) if isinstance(once, torch.fx.GraphModule) else (lambda m: m(x))
    gates = {"heads": FixedGate(torch.tensor([[1.0, 0, 1]])), "attention_blocks": FixedGate(torch.tensor([1.0]))}
    second = apply_masks(once, heads=True, attention_blocks=True, gates=gates)
    with torch.no_grad():
        gated = run(once)
        twice = finalize(second)
        assert (run(twice) - gated).abs().max().item() <= 1e-5


@pytest.mark.parametrize("granularity", ["heads", "ffn"])
def test_default_encoder_with_nested_tensors_is_gated_and_finalized(granularity):
    """nn.TransformerEncoder's default turns a padded batch into a nested tensor in inference;
    gates and rebuilt blocks need dense tensors: the path is off while gated and in the result,
    and remove() turns it back on."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True), 2).eval()
    assert model.use_nested_tensor
    x = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 4:] = True
    if granularity == "heads":
        mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    else:
        mask = (torch.arange(32) % 3 > 0).float().repeat(2, 1)
    handle = apply_masks(model, **{granularity: True}, gates={granularity: FixedGate(mask)})
    with torch.no_grad():
        gated = model(x, src_key_padding_mask=padding)
        plain = finalize(handle)
        out = plain(x, src_key_padding_mask=padding)
    kept = ~padding[..., None]  # the nested path leaves padded positions as zeros: compare real tokens
    assert ((out - gated) * kept).abs().max().item() <= 1e-5
    assert not plain.use_nested_tensor or granularity == "ffn"
    handle.remove()
    assert model.use_nested_tensor


@pytest.mark.parametrize("options", [dict(kdim=10, vdim=14), dict(add_bias_kv=True), dict(bias=False, kdim=9, vdim=9)])
def test_parameter_counts_with_kdim_vdim_and_bias_kv(options):
    """Rows reading kdim/vdim are not the stream's width, bias_k/bias_v are per head: the counts
    of the gated model equal the finalized model's, before and after gating it again."""
    mha = _stock(batch_first=True, **options)
    dense = sum(p.numel() for p in mha.parameters())
    handle = apply_masks(mha, heads=True, gates={"heads": FixedGate(torch.tensor([[1.0, 0, 1, 0]]))})
    assert handle.dense_parameters() == handle.prunable_parameters() == dense
    plain = finalize(handle)
    assert sum(p.numel() for p in plain.parameters()) == handle.remaining_parameters()
    again = apply_masks(plain, heads=True, gates={"heads": FixedGate(torch.tensor([[0.0, 1.0]]))})
    assert again.prunable_parameters() == again.dense_parameters() == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in finalize(again).parameters()) == again.remaining_parameters()
    report = layer_report(handle, seq_len=4)[0]
    kv_in = options.get("kdim", E) + options.get("vdim", E)
    assert report.flops_attention == 2 * 4 * 2 * D * (2 * E + kv_in) + 4 * 4 * 4 * 2 * D + 2 * 4 * (2 * D) ** 2


def test_encoder_prune_benchmark_quick_mode(tmp_path, capsys):
    import json
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    try:
        import prune
    finally:
        sys.path.pop(0)
    args = ["--model", "encoder", "--quick", "--threads", "1", "--runs", "1", "--output", str(tmp_path / "r.json")]
    threads = torch.get_num_threads()
    try:
        assert prune.main(args) == 0
    finally:  # the benchmark sets the process's thread count; later tests compare bits across processes
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["heads_kept"] == 36 and result["ffn_units_kept"] == 4608
    assert result["parameters_pruned"] < result["parameters_dense"] / 1.9
    assert result["finalize_vs_gated_max_abs_diff"] <= 1e-5
    seq, kept = 64, 6 * 32  # the query identity map of each layer: 2 S (H' D)^2 per sequence
    assert result["flops_pruned"] == pytest.approx(result["flops_dense"] / 2 + 8 * 6 * 2 * seq * kept ** 2, rel=1e-9)
    assert "nn.TransformerEncoder (MiniLM shape) prune benchmark" in capsys.readouterr().out
