"""Head gates (``apply_head_gates``, a thin wrapper of ``apply_masks(heads=True)``): invariances and
exact values on tiny random models, on the op path (Hugging Face models) and the hook path."""
import copy

import pytest
import torch
import transformers
from conftest import tiny_bert
from torch import nn

from learnmask.gates import FixedGate, HardConcreteGate
from learnmask.inject import apply_head_gates, apply_masks

IDS = torch.randint(5, 100, (3, 9))
MASK = torch.ones(3, 9, dtype=torch.long).index_fill_(1, torch.tensor([7, 8]), 0)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def test_finds_every_bert_block():
    handle = apply_head_gates(tiny_bert(layers=3, heads=4))
    assert [layer.name for layer in handle.layers] == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert handle.gates["heads"].shape == (3, 4)


@pytest.mark.parametrize("gate", ["open_fixed", "hard_concrete_eval"])
def test_all_open_gate_reproduces_base_logits(gate):
    model = tiny_bert()
    base = logits(model)
    g = FixedGate(torch.ones(2, 4)) if gate == "open_fixed" else HardConcreteGate((2, 4), init_log_alpha=5.0)
    handle = apply_head_gates(model, g)
    model.eval()
    assert torch.equal(handle.gates["heads"](), torch.ones(2, 4))
    assert (logits(model) - base).abs().max().item() <= 1e-6


def test_remove_restores_model_bit_for_bit():
    model = tiny_bert()
    before_state = copy.deepcopy(model.state_dict())
    base = logits(model)
    handle = apply_head_gates(model, FixedGate(torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])))
    assert not torch.equal(logits(model), base)  # the gate does act
    assert any(k.startswith("learnmask_gates.heads") for k in model.state_dict())
    handle.remove()
    assert list(model.state_dict()) == list(before_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert torch.equal(logits(model), base)
    assert not model._forward_pre_hooks


def test_closed_head_equals_zeroed_value_rows():
    """Closing head h == zeroing the rows of head h in the value projection (softmax·V = 0)."""
    model, heads, head_dim = tiny_bert(), 4, 8
    reference = copy.deepcopy(model)
    with torch.no_grad():
        value = reference.bert.encoder.layer[1].attention.self.value
        value.weight[2 * head_dim : 3 * head_dim] = 0
        value.bias[2 * head_dim : 3 * head_dim] = 0
    mask = torch.ones(2, heads)
    mask[1, 2] = 0
    apply_head_gates(model, FixedGate(mask))
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)


def test_half_gate_scales_head_output_linearly():
    """z = 0.5 on every head halves the input of the output projection (bias unchanged)."""
    model = tiny_bert(layers=1)
    seen = []
    dense = model.bert.encoder.layer[0].attention.output.dense
    capture = dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    logits(model)
    capture.remove()
    handle = apply_head_gates(model, HardConcreteGate((1, 4), init_log_alpha=0.0))
    capture = dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))  # runs after the gate
    model.eval()  # log_alpha = 0 gives the deterministic gate 0.5 exactly (case G1)
    logits(model)
    torch.testing.assert_close(seen[1], seen[0] * 0.5)
    capture.remove()
    handle.remove()


def test_eval_keeps_exactly_k_heads():
    model = tiny_bert(layers=3, heads=4)
    gate = HardConcreteGate((3, 4))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 12).reshape(3, 4))
    handle = apply_head_gates(model, gate)
    for k in (1, 5, 11):
        gate.eval_k = k
        model.eval()
        logits(model)
        assert int((handle.z["heads"] > 0).sum()) == k
        expected = torch.zeros(12)
        expected[12 - k :] = 1  # the k largest log_alpha are the last k
        assert torch.equal(handle.z["heads"].flatten(), expected)


def test_one_sample_per_forward_shared_by_layers():
    model = tiny_bert(layers=2)
    handle = apply_head_gates(model, HardConcreteGate((2, 4), init_log_alpha=0.0))
    model.train()
    seen = []
    for layer in model.bert.encoder.layer:
        layer.attention.output.dense.register_forward_pre_hook(lambda m, a: seen.append(handle.z["heads"]))
    model(input_ids=IDS, attention_mask=MASK)
    assert seen[0] is seen[1]
    assert ((handle.z["heads"] > 0) & (handle.z["heads"] < 1)).any()  # a training sample, not the eval mask


def _eval_gate(values):
    """A hard-concrete gate whose deterministic (eval) value is exactly ``values`` in (0, 1]."""
    values = torch.as_tensor(values, dtype=torch.float64)
    log_alpha = torch.where(values >= 1, torch.tensor(10.0, dtype=torch.float64), torch.logit((values + 0.1) / 1.2))
    gate = HardConcreteGate(tuple(values.shape), init_log_alpha=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha.float())
    return gate.eval()


def test_capture_grad_gives_head_importance_values():
    model = tiny_bert(layers=1)
    handle = apply_head_gates(model, _eval_gate([[0.5, 1, 1, 1]]))
    handle.capture_grad = True
    out = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    grad = handle.z["heads"].grad.clone()
    # finite-difference check of dL/dz for head 0
    eps = 1e-3
    handle.capture_grad = False
    losses = []
    for sign in (1, -1):
        handle.set_gate("heads", _eval_gate([[0.5 + sign * eps, 1, 1, 1]]))
        with torch.no_grad():
            losses.append(model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 2])).loss.item())
    assert abs((losses[0] - losses[1]) / (2 * eps) - grad[0, 0].item()) < 1e-3


def test_parameter_count_of_removed_heads_is_the_finalized_models():
    model = tiny_bert(layers=2, heads=4, hidden=32)
    mask = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 0]])
    handle = apply_head_gates(model, FixedGate(mask))
    real = sum(p.numel() for p in handle.finalize().parameters())
    assert handle.remaining_parameters() == real == handle.parameters_for({"heads": mask})
    total = sum(p.numel() for p in tiny_bert(layers=2, heads=4, hidden=32).parameters())
    assert real == total - 3 * (4 * 32 * 8 + 3 * 8)  # and the hand count: q, k, v rows + biases, out columns


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: transformers.DistilBertModel(
            transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
         "out_lin"),
        (lambda: transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4)),
         "c_proj"),
        (lambda: transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
         "output.dense"),
    ],
)
def test_other_architectures_open_gate_is_identity(make, expected):
    model = make().eval()
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    handle = apply_head_gates(model, FixedGate(torch.ones(2, 4)))
    names = {id(m): n for n, m in model.named_modules()}
    assert all(names[id(layer.attention.out)].endswith(expected) for layer in handle.layers)
    assert len(handle.layers) == 2
    with torch.no_grad():
        assert (model(input_ids=ids).last_hidden_state - base).abs().max().item() <= 1e-6
        handle.set_gate("heads", FixedGate(torch.zeros(2, 4)))
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, base)


def test_no_attention_blocks_is_a_clear_error():
    with pytest.raises(ValueError,
                       match=r"no attention blocks found in Sequential \(supported: .*\); pass target_modules"):
        apply_head_gates(nn.Sequential(nn.Linear(4, 4)))


def test_target_modules_for_a_custom_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model[1](model[0](x) * torch.tensor([1.0] * 4 + [0.0] * 4))
    handle = apply_head_gates(model, FixedGate(torch.tensor([[1.0, 0]])), target_modules=["1"], num_heads=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    handle.remove()
    with pytest.raises(ValueError, match="target module 'nope' not found"):
        apply_head_gates(model, "hard_concrete", target_modules=["nope"], num_heads=2)
    with pytest.raises(ValueError, match="without num_heads"):
        apply_head_gates(model, "hard_concrete", target_modules=["1"])


def test_wrong_gate_shape_and_double_apply_are_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"heads gate has shape \(3, 4\); expected \(2, 4\)"):
        apply_head_gates(model, FixedGate(torch.ones(3, 4)))
    apply_head_gates(model, "hard_concrete")
    with pytest.raises(ValueError, match="already has learnmask gates"):
        apply_head_gates(model, "hard_concrete")
    with pytest.raises(ValueError, match="already has learnmask gates"):  # across the two entry points too
        apply_masks(model, ffn=True)


def test_gate_follows_the_model_mode_when_applied():
    """A model loaded for inference (eval mode) gets its deterministic gate, never samples."""
    model = tiny_bert()  # in eval mode
    handle = apply_head_gates(model, "hard_concrete", init_log_alpha=3.0)
    assert not handle.gates["heads"].training
    base = logits(model)
    assert torch.equal(handle.z["heads"], torch.ones(2, 4)) and torch.equal(logits(model), base)
    handle.set_gate("heads", FixedGate(torch.ones(2, 4)))
    assert not handle.gates["heads"].training
    model.train()
    assert handle.gates["heads"].training


def test_multihead_attention_out_proj_as_target_is_refused_not_silently_ungated():
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="apply_masks"):
        apply_head_gates(encoder, "hard_concrete", target_modules=["layers.0.self_attn.out_proj"], num_heads=4)


def test_gate_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(TypeError, match="Gate or a registered gate kind name; got int"):
        apply_head_gates(tiny_bert(num_labels=2, layers=2, heads=4), 3)


def test_unregistered_gate_on_a_sequential_follows_eval_mode():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    model = torch.nn.Sequential(Attention(), Attention())
    handle = apply_head_gates(model, "hard_concrete", target_modules=["0.proj", "1.proj"], num_heads=4,
                              init_log_alpha=0.0)
    assert not handle.registered
    model.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not handle.gates["heads"].training
    assert torch.equal(first, second)
