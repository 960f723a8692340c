"""Exporting token gates (issue 13): ``finalize`` / ``handle.export_token_pruning()`` give a model
that drops tokens at inference with no learnmask hook and no learnmask attention function, and
whose outputs are the gated model's eval outputs (``token_inference="drop"``).

Same tiny models as ``test_token_gates.py``: 3 layers, pruning after layers 0 and 1.
"""
import pytest
import torch
from test_token_gates import ARCHS, HEADS, LAYERS, TOL, batch_for, gate, make, output, real_counts
from torch import nn

from learnmask.export import finalize, save_pruned
from learnmask.export.tokens import TokenDroppingLayers
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks

OTHER_LENGTHS = (5, 11)  # a second padded batch of other lengths for the same export


def stack_of(model: nn.Module) -> TokenDroppingLayers:
    (stack,) = [m for m in model.modules() if isinstance(m, TokenDroppingLayers)]
    return stack


def assert_plain(model: nn.Module) -> None:
    """No hook of any kind on any submodule, and no config attending through learnmask."""
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not module._backward_hooks and not module._backward_pre_hooks, name
        config = getattr(module, "config", None)
        if config is not None:
            assert config._attn_implementation == "sdpa", name
    assert not any("learnmask" in key for key in model.state_dict())


@pytest.mark.parametrize("name", ARCHS)
def test_the_export_equals_the_gated_models_eval_output_without_hooks(name):
    model, batch = make(name), batch_for(name)
    other = batch_for(name, seed=2, lengths=OTHER_LENGTHS)
    handle = gate(model, token_keep_ratio=(0.6, 0.4))
    with torch.no_grad():
        gated, gated_other = output(name, model, batch), output(name, model, other)
    exported = handle.export_token_pruning()
    assert exported is not model
    assert_plain(exported)
    seen = []
    stack_of(exported).layers[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        dropped, dropped_other = output(name, exported, batch), output(name, exported, other)
    counts = [torch.round(real_counts(name, b).double() * 0.4).long().clamp_min(1).max().item()
              for b in (batch, other)]
    assert seen == counts  # the last layer ran on the shorter batch
    assert (dropped - gated).abs().max().item() <= TOL
    assert (dropped_other - gated_other).abs().max().item() <= TOL
    with torch.no_grad():  # the gated model is left as it was
        assert torch.equal(output(name, model, batch), gated)


@pytest.mark.parametrize("name", ARCHS)
def test_an_export_at_keep_ratio_one_is_the_base_model(name):
    model, batch = make(name), batch_for(name)
    with torch.no_grad():
        base = output(name, model, batch)
    exported = gate(model, token_keep_ratio=1.0).export_token_pruning()
    with torch.no_grad():
        assert (output(name, exported, batch) - base).abs().max().item() <= 1e-6


def test_head_and_token_gates_export_together_heads_removed_and_tokens_dropped():
    model, batch = make("bert"), batch_for("bert")
    heads = torch.ones(LAYERS, HEADS)
    heads[1:, :2] = 0.0  # closed heads in the layers after pruning
    handle = gate(model, heads=True, gates={"heads": FixedGate(heads)})
    with torch.no_grad():
        gated = output("bert", model, batch)
    exported = finalize(model)
    assert_plain(exported)
    layers = stack_of(exported).layers
    assert [layer.attention.self.query.out_features for layer in layers] == [32, 16, 16]
    with torch.no_grad():
        assert (output("bert", exported, batch) - gated).abs().max().item() <= TOL
    assert handle.tokens is not None


@pytest.mark.parametrize("name", ["bert", "vit", "encoder_layer"])
def test_a_state_dict_loaded_into_a_fresh_export_gives_bit_identical_outputs(name):
    batch = batch_for(name)
    first = gate(make(name), token_keep_ratio=0.5)
    for scorer in first.tokens.scorers:
        nn.init.normal_(scorer.linear.weight, std=1.0)  # decisive scores, unlike a fresh scorer's
    exported = first.export_token_pruning()
    fresh = gate(make(name, seed=7), token_keep_ratio=0.5).export_token_pruning()
    with torch.no_grad():
        expected = output(name, exported, batch)
        assert not torch.equal(output(name, fresh, batch), expected)
        fresh.load_state_dict(exported.state_dict())
        assert torch.equal(output(name, fresh, batch), expected)


def test_an_inplace_export_takes_the_gates_off_the_model():
    model, batch = make("distilbert"), batch_for("distilbert")
    handle = gate(model)
    with torch.no_grad():
        gated = output("distilbert", model, batch)
    exported = handle.export_token_pruning(inplace=True)
    assert exported is model
    assert_plain(model)
    with torch.no_grad():
        assert (output("distilbert", model, batch) - gated).abs().max().item() <= TOL


def test_export_refusals_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no token gates on this model .* use finalize"):
        apply_masks(make("bert"), heads=True).export_token_pruning()
    with pytest.raises(ValueError, match="hidden-dimension gates together with token gates"):
        gate(make("bert"), hidden=True).export_token_pruning()
    exported = gate(make("bert")).export_token_pruning()
    with pytest.raises(ValueError, match="it drops tokens .* save its state_dict"):
        save_pruned(exported, tmp_path / "saved")
    batch = batch_for("bert")
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding: no CLS at position 0
    with pytest.raises(ValueError, match="first token of every example .* pad on the right"):
        output("bert", exported, batch)
    encoder = gate(make("encoder_layer")).export_token_pruning()
    src = batch_for("encoder_layer")["src"]
    with pytest.raises(ValueError, match="key padding mask only"):
        encoder(src, mask=torch.zeros(src.shape[1], src.shape[1]))
