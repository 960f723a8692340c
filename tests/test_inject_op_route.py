"""Gated Hugging Face models attend through learnmask's masked-attention op.

Checked on tiny models of the six architectures whose attention goes through transformers'
attention interface: equal to the model's own ``sdpa`` attention with gates open, equal to the
hook path with gates closed (forward and gradients, gates included), padding and causal masks
honoured (the trap: an attention function registered without a mask function gets
``attention_mask=None``), ``remove()`` switches back, and the hook path keeps its reasons.
"""
import copy

import pytest
import torch
import zoo

from learnmask.gates import FixedGate
from learnmask.inject import apply_masks, hf_attention
from learnmask.ops import BackendNotSupported

HF = ["bert", "roberta", "distilbert", "gpt2", "vit", "llama"]
TOL = 1e-5


def batch_for(name: str) -> dict:
    """zoo's inputs, with right padding for the causal models too (causal & padding)."""
    batch = zoo.inputs(name)
    if name in ("gpt2", "llama"):
        mask = torch.ones_like(batch["input_ids"])
        mask[1, 4:] = 0
        batch["attention_mask"] = mask
    return batch


def output(model, batch):
    return model(**batch).logits


def _seeded_forward_backward(model, batch, handle, seed=0):
    """Loss, parameter grads and gate grads of one training-mode step with seeded gate samples."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = output(model, batch)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("name", HF)
def test_every_gated_block_attends_through_the_op(name):
    model = zoo.make(name)
    handle = apply_masks(model, heads=True)
    assert handle.attention_paths and all(p.path == "op" for p in handle.attention_paths.values())
    assert model.config._attn_implementation == hf_attention.NAME
    assert all(hf_attention.ROUTE_ATTRIBUTE in vars(hf_attention.attention_module(layer)) for layer in handle.layers)
    calls = []
    real = hf_attention.attention_forward

    def spy(*args, **kwargs):
        calls.append(args[4])  # the mask the model built through learnmask's mask function
        return real(*args, **kwargs)

    from transformers.modeling_utils import AttentionInterface

    AttentionInterface._global_mapping[hf_attention.NAME] = spy
    try:
        output(model, batch_for(name))
    finally:
        AttentionInterface._global_mapping[hf_attention.NAME] = real
    assert len(calls) == zoo.LAYERS
    if name != "vit":  # padding (and causal) arrive as a learnmask mask, never None
        from learnmask.masks.attention import AttentionMask

        assert all(isinstance(mask, AttentionMask) for mask in calls)


@pytest.mark.parametrize("name", HF)
def test_open_gates_equal_the_models_own_sdpa_attention_forward_and_backward(name):
    model, batch = zoo.make(name), batch_for(name)
    model.train()  # zoo models have no dropout: train mode only makes gates sample
    reference = copy.deepcopy(model)
    ref_out = output(reference, batch)
    (ref_out * torch.linspace(-1, 1, ref_out.numel()).view_as(ref_out)).sum().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(torch.ones(zoo.LAYERS, zoo.HEADS))})
    out, grads = _seeded_forward_backward(model, batch, handle)
    assert (out - ref_out.detach()).abs().max().item() <= TOL
    assert set(grads) == set(ref_grads)
    for key, grad in grads.items():
        assert (grad - ref_grads[key]).abs().max().item() <= TOL, key


@pytest.mark.parametrize("name", HF)
def test_closed_gates_through_the_op_equal_the_hook_path_gates_included(name):
    model, batch = zoo.make(name), batch_for(name)
    model.train()

    def run(attention):
        m = copy.deepcopy(model)
        handle = apply_masks(m, heads=True, attention=attention, gate_options={"init_log_alpha": 0.0})
        with torch.no_grad():
            noise = torch.randn(zoo.LAYERS, zoo.HEADS, generator=torch.Generator().manual_seed(3))
            handle.gates["heads"].log_alpha.copy_(noise * 2)
        out, grads = _seeded_forward_backward(m, batch, handle)
        return out, grads, handle

    out_op, grads_op, op = run("op")
    out_hooks, grads_hooks, hooks = run("hooks")
    assert all(p.path == "hooks" for p in hooks.attention_paths.values())
    z = op.z["heads"]
    assert bool(((z > 0) & (z < 1)).any()) and bool((z == 0).any())  # soft and closed heads in this sample
    assert (out_op - out_hooks).abs().max().item() <= TOL
    gate_grad = "learnmask_gates.heads.log_alpha"
    assert grads_op[gate_grad].abs().sum() > 0
    assert set(grads_op) == set(grads_hooks)
    for key in grads_op:
        assert (grads_op[key] - grads_hooks[key]).abs().max().item() <= TOL, key


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama"])
def test_padding_is_honoured_not_ignored(name):
    """The trap: the padded row must equal the same sequence run unpadded (a model that got
    attention_mask=None would let its real tokens attend to the padding)."""
    model, batch = zoo.make(name), batch_for(name)
    apply_masks(model, heads=True, gate_options={"init_log_alpha": 5.0})
    row = 1
    length = int(batch["attention_mask"][row].sum())
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[row]
        alone = model(input_ids=batch["input_ids"][row:row + 1, :length]).logits[0]
    if name in ("gpt2", "llama"):  # token logits: the real positions agree
        assert (full[:length] - alone).abs().max().item() <= TOL
    else:  # sequence classification from the first token
        assert (full - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("name", HF)
def test_remove_switches_the_model_back_bit_for_bit(name):
    model, batch = zoo.make(name), batch_for(name)
    own = model.config._attn_implementation
    base = zoo.run(name, model, batch)
    handle = apply_masks(model, heads=True, ffn=True)
    with torch.no_grad():
        handle.gates["heads"].log_alpha.normal_(0, 3)
    assert not torch.equal(zoo.run(name, model, batch), base)
    handle.remove()
    assert model.config._attn_implementation == own
    assert not any(hf_attention.ROUTE_ATTRIBUTE in vars(m) for m in model.modules())
    assert torch.equal(zoo.run(name, model, batch), base)


def test_a_deep_copy_attends_with_its_own_gates():
    model, batch = zoo.make("bert"), batch_for("bert")
    handle = apply_masks(model, heads=True, gate_options={"init_log_alpha": 5.0})
    twin = copy.deepcopy(model)
    twin_gate = twin.learnmask_gates["heads"]
    with torch.no_grad():
        twin_gate.log_alpha[0, :3] = -5.0  # close 3 heads of the copy only
    assert not torch.equal(zoo.run("bert", twin, batch), zoo.run("bert", model, batch))
    assert handle.gates["heads"].log_alpha.min() > 0


def test_finalize_of_a_routed_model_is_a_plain_sdpa_model_equal_to_the_gated_one():
    model, batch = zoo.make("bert"), batch_for("bert")
    mask = torch.ones(zoo.LAYERS, zoo.HEADS)
    mask[0, 1] = mask[1, 3] = 0
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(mask)})
    gated = zoo.run("bert", model, batch)
    small = handle.finalize()
    assert small.config._attn_implementation == "sdpa"
    assert not any(hf_attention.ROUTE_ATTRIBUTE in vars(m) for m in small.modules())
    assert model.config._attn_implementation == hf_attention.NAME  # the gated model keeps its route
    assert (zoo.run("bert", small, batch) - gated).abs().max().item() <= TOL


def test_blocks_outside_the_interface_keep_hooks_with_the_reason():
    model = zoo.make("encoder_layer")
    handle = apply_masks(model, heads=True)
    paths = set(handle.attention_paths.values())
    assert paths == {hf_attention.AttentionPath(
        "hooks", "nn.MultiheadAttention computes attention inside torch (F.multi_head_attention_forward)")}
    handle.remove()
    with pytest.raises(ValueError, match="cannot attend through learnmask's masked-attention op"):
        apply_masks(model, heads=True, attention="op")
    assert not hasattr(model, "learnmask_gates")


def test_a_named_backend_that_cannot_run_says_why():
    model, batch = zoo.make("bert"), batch_for("bert")
    handle = apply_masks(model, heads=True, backend="flex")
    model.train()
    with pytest.raises(BackendNotSupported, match="backend 'flex' cannot run these inputs"):
        output(model, batch).sum().backward()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        handle.backend = "nope"
    handle.backend = "reference"
    model.eval()
    base = zoo.run("bert", copy.deepcopy(model), batch)
    assert (zoo.run("bert", model, batch) - base).abs().max().item() <= TOL


@pytest.mark.parametrize("backend", ["reference", "blocks", "sdpa"])
def test_every_cpu_backend_gives_the_same_gated_model(backend):
    model, batch = zoo.make("llama"), batch_for("llama")
    handle = apply_masks(model, heads=True, gate_options={"init_log_alpha": 0.5})
    handle.backend = "reference"
    expected = zoo.run("llama", model, batch)
    handle.backend = backend
    assert (zoo.run("llama", model, batch) - expected).abs().max().item() <= TOL


def test_a_tiny_model_runs_the_triton_backend_under_the_interpreter():
    pytest.importorskip("triton")
    from learnmask.ops.triton_backend import TritonBackend

    model, batch = zoo.make("bert"), batch_for("bert")
    mask = torch.ones(zoo.LAYERS, zoo.HEADS)
    mask[1, 0] = 0
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(mask)})
    handle.backend = "reference"
    expected = zoo.run("bert", model, batch)
    calls = []
    triton = TritonBackend(cpu_interpreter=True)
    real = triton.__call__

    class Counting(type(triton)):
        def __call__(self, inputs):
            calls.append(inputs.q.shape)
            return real(inputs)

    triton.__class__ = Counting
    handle.backend = triton
    assert (zoo.run("bert", model, batch) - expected).abs().max().item() <= 1e-4
    assert len(calls) == zoo.LAYERS


def test_triton_backend_gradients_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    from learnmask.ops.triton_backend import TritonBackend

    model, batch = zoo.make("bert"), batch_for("bert")
    model.train()
    handle = apply_masks(model, heads=True, gate_options={"init_log_alpha": 0.5})
    results = []
    for backend in ("reference", TritonBackend(cpu_interpreter=True)):
        handle.backend = backend
        results.append(_seeded_forward_backward(model, batch, handle))
    (out_ref, grads_ref), (out_tri, grads_tri) = results
    assert (out_tri - out_ref).abs().max().item() <= 1e-4
    assert grads_tri["learnmask_gates.heads.log_alpha"].abs().sum() > 0
    for key in grads_ref:
        assert (grads_tri[key] - grads_ref[key]).abs().max().item() <= 1e-4, key


def _hf_keep(mu, **kwargs):
    """transformers' own boolean mask (B, 1, Q, K) for the same arguments (never skipped)."""
    keep = mu.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    return keep.expand(kwargs["batch_size"], 1, kwargs["q_length"], kwargs["kv_length"])


@pytest.mark.parametrize("case", ["causal", "bidirectional", "sliding_window", "packed", "cache_offset"])
def test_the_mask_function_gives_transformers_own_mask(case):
    """Every mask transformers hands learnmask's mask function comes back as the same keep-mask:
    structured where its parts are known (causal, sliding window), pair by pair otherwise."""
    from transformers import masking_utils as mu

    from learnmask.masks.attention import AttentionMask

    batch, q_len, kv_len = 3, 7, 7
    padding = torch.ones(batch, kv_len, dtype=torch.bool)
    padding[1, 5:] = False
    padding[2, 0] = False  # left padding too
    offset = 0
    function = {"causal": mu.causal_mask_function, "bidirectional": mu.bidirectional_mask_function,
                "sliding_window": mu.sliding_window_causal_mask_function(3),
                "packed": mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(
                    torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * batch))),
                "cache_offset": mu.causal_mask_function}[case]
    if case == "cache_offset":  # 3 new queries after 4 cached keys
        q_len, offset = 3, 4
    arguments = dict(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=offset, kv_offset=0,
                     mask_function=function, attention_mask=padding)
    mask = hf_attention.mask_function(**arguments)
    assert isinstance(mask, AttentionMask)
    expected = _hf_keep(mu, **arguments)
    assert torch.equal(mask.keep(batch, 1, q_len, kv_len), expected)
    if case in ("causal", "sliding_window"):
        assert mask.structure() is not None  # block-sparse backends can skip what it keeps out
    if case == "sliding_window":
        assert mask.structure().window == 3


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generation_with_a_kv_cache_equals_the_models_own_attention(name):
    """Decoding with a cache shifts query positions (q_offset > 0): the causal mask must follow."""
    model = zoo.make(name)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(5, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as for generation
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        own = model.generate(ids, **options)
        apply_masks(model, heads=True, gates={"heads": FixedGate(torch.ones(zoo.LAYERS, zoo.HEADS))})
        routed = model.generate(ids, **options)
    assert model.config._attn_implementation == hf_attention.NAME
    assert torch.equal(routed.sequences, own.sequences)
    for a, b in zip(routed.logits, own.logits):
        assert (a - b).abs().max().item() <= TOL
