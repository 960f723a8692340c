"""Token gates (issue 13): per-example keep decisions after chosen layers, trained through the
masked-attention op's ``token_gate`` and dropped for real (gathered) in eval.

Tiny models of every supported architecture (BERT, RoBERTa, DistilBERT, ViT,
``nn.TransformerEncoderLayer``), 3 layers, pruning after layers 0 and 1.
"""
import pytest
import torch
from torch import nn

from learnmask.control import LagrangianController, PIController
from learnmask.inject import apply_masks

ARCHS = ["bert", "roberta", "distilbert", "vit", "encoder_layer"]
TOL = 1e-5
HIDDEN, HEADS, LAYERS = 32, 4, 3


def make(name: str, seed: int = 0, layers: int = LAYERS) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if name == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **common))
    elif name == "roberta":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=100, num_labels=3, **common))
    elif name == "distilbert":
        model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=100, dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=64, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3))
    elif name == "vit":  # 16x16 pixels at patch 4: 16 patches + CLS = 17 tokens
        model = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_labels=3, **common))
    elif name == "encoder_layer":
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 64, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    else:
        raise ValueError(name)
    return model.eval()


def batch_for(name: str, seed: int = 1, lengths=(12, 7, 10)) -> dict:
    """Inputs with right padding (examples of the given real lengths) where the model takes it."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    if name in ("bert", "roberta", "distilbert"):
        ids = torch.randint(5, 100, (len(lengths), width), generator=g)
        return {"input_ids": ids, "attention_mask": mask}
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"src": torch.randn(len(lengths), width, HIDDEN, generator=g), "src_key_padding_mask": mask == 0}


def output(name: str, model: nn.Module, batch: dict) -> torch.Tensor:
    """What a task reads: logits, or the CLS (first) token of the encoder stack."""
    if name == "encoder_layer":
        return model(**batch)[:, 0]
    return model(**batch).logits


def gate(model, **options):
    options = {"heads": False, "tokens": True, "token_layers": [0, 1], "token_keep_ratio": 0.5, **options}
    return apply_masks(model, **options)


def last_layer(handle) -> nn.Module:
    return handle.layers[-1].module


def real_counts(name, batch) -> torch.Tensor:
    if name == "vit":
        return torch.full((batch["pixel_values"].shape[0],), 17)
    if name == "encoder_layer":
        return (~batch["src_key_padding_mask"]).sum(1)
    return batch["attention_mask"].sum(1)


# -- the eval path drops tokens and equals the training-time path with the same hard mask ------------

@pytest.mark.parametrize("name", ARCHS)
def test_dropping_tokens_equals_the_masked_path_with_the_same_hard_mask(name):
    model, batch = make(name), batch_for(name)
    handle = gate(model, token_keep_ratio=(0.6, 0.4))
    seen = []
    last_layer(handle).register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        handle.token_inference = "mask"
        masked, masked_kept = output(name, model, batch), handle.token_masks()
        handle.token_inference = "drop"
        dropped, dropped_kept = output(name, model, batch), handle.token_masks()
    n = real_counts(name, batch)
    counts = [torch.round(n.double() * r).long().clamp_min(1) for r in (0.6, 0.4)]
    for stage in range(2):
        assert torch.equal(masked_kept[stage], dropped_kept[stage])
        assert torch.equal(dropped_kept[stage].sum(1), counts[stage])  # exactly round(r * n_real) per example
        assert bool(dropped_kept[stage][:, 0].all())  # CLS always kept
    assert bool((dropped_kept[1] <= dropped_kept[0]).all())
    width = 17 if name == "vit" else 12
    assert seen == [width, int(counts[1].max())]  # the last layer ran on the shorter sequence
    assert (masked - dropped).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ARCHS)
def test_keep_ratio_one_reproduces_the_base_model(name):
    model, batch = make(name), batch_for(name)
    with torch.no_grad():
        base = output(name, model, batch)
    handle = gate(model, token_keep_ratio=1.0)
    with torch.no_grad():
        dropped = output(name, model, batch)
        handle.token_inference = "mask"
        masked = output(name, model, batch)
    assert torch.equal(dropped, masked)
    assert (dropped - base).abs().max().item() <= 1e-6
    handle.remove()
    with torch.no_grad():
        assert torch.equal(output(name, model, batch), base)
    assert not hasattr(model, "learnmask_tokens")


# -- training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hard_concrete", "gumbel_sigmoid", "threshold", "topk"])
@pytest.mark.parametrize("name", ["bert", "encoder_layer"])
def test_gradients_of_the_task_loss_reach_every_scorer(name, kind):
    model, batch = make(name), batch_for(name)
    options = {"init_log_alpha": 0.0} if kind in ("hard_concrete", "gumbel_sigmoid") else {}
    handle = gate(model, token_gate=kind, token_gate_options=options)
    model.train()
    torch.manual_seed(3)
    out = output(name, model, batch)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for scorer in handle.tokens.scorers:
        grad = scorer.linear.weight.grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum().item() > 0
    assert set(map(id, handle.gate_parameters())) == set(map(id, handle.tokens.parameters()))
    assert not set(map(id, handle.base_parameters())) & set(map(id, handle.tokens.parameters()))


@pytest.mark.parametrize("name", ["bert", "distilbert", "encoder_layer"])
def test_each_example_of_a_padded_batch_equals_itself_alone(name):
    model, batch = make(name), batch_for(name)
    gate(model, token_keep_ratio=(0.7, 0.4))
    with torch.no_grad():
        together = output(name, model, batch)
        for row, length in enumerate(real_counts(name, batch).tolist()):
            alone = {key: value[row:row + 1, :length] for key, value in batch.items()}
            assert (output(name, model, alone)[0] - together[row]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["bert", "encoder_layer"])
def test_padding_is_never_kept_nor_counted(name):
    model, batch = make(name), batch_for(name)
    handle = gate(model, token_gate_options={"init_log_alpha": 10.0})
    real = ~batch["src_key_padding_mask"] if name == "encoder_layer" else batch["attention_mask"].bool()
    model.train()
    output(name, model, batch)
    for kept in handle.token_masks():
        assert not bool((kept & ~real).any())
    # all real tokens nearly surely kept: the ratio counts real tokens only, so it is ~1 (not 31/36)
    assert handle.expected_keep_ratio("tokens").item() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bert", "vit", "encoder_layer"])
def test_every_non_special_token_closed_gives_finite_outputs_and_gradients(name, dtype):
    model, batch = make(name), batch_for(name)
    handle = gate(model, token_keep_ratio=0.01)  # eval: round(0.01 n) = 0 -> CLS alone
    for scorer in handle.tokens.scorers:
        nn.init.constant_(scorer.linear.bias, -30.0)  # hard-concrete z = 0 surely: only CLS left
    model.to(dtype).train()
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    out = output(name, model, batch)
    kept = handle.token_masks()[-1]
    assert torch.equal(kept.sum(1), torch.ones(kept.shape[0], dtype=torch.long))
    loss = out.float().sum() + handle.expected_unit_sparsity("tokens")
    loss.backward()
    assert bool(torch.isfinite(out).all())
    for p in model.parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all())
    model.eval()
    with torch.no_grad():
        for mode in ("drop", "mask"):
            handle.token_inference = mode
            assert bool(torch.isfinite(output(name, model, batch)).all())
            assert torch.equal(handle.token_masks()[-1].sum(1), torch.ones(kept.shape[0], dtype=torch.long))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ARCHS)
def test_a_closed_tokens_value_never_reaches_a_kept_token(name, mode):
    """Hard masks (eval "mask" mode; training with straight-through top-k): perturbing every
    closed token's hidden state right after it is closed leaves every kept token's output
    exactly as it was."""
    model, batch = make(name), batch_for(name)
    handle = gate(model, token_gate="topk", token_layers=[0])
    handle.token_inference = "mask"
    model.train(mode == "train")
    final = []
    last_layer(handle).register_forward_hook(lambda m, a, out: final.append(out))
    perturb = {"on": False}

    def shake(module, args, out):
        if perturb["on"]:
            closed = ~handle.token_masks()[0]
            return out + 100.0 * closed[:, :, None].to(out.dtype) * torch.randn_like(out)
        return None

    handle.layers[0].module.register_forward_hook(shake)
    with torch.set_grad_enabled(mode == "train"):
        output(name, model, batch)
        perturb["on"] = True
        output(name, model, batch)
    kept = handle.token_masks()[0]
    assert bool((~kept).any())
    before, after = final[0][kept], final[1][kept]
    assert torch.equal(before, after)
    assert not torch.equal(final[0][~kept], final[1][~kept])  # the perturbation did happen


@pytest.mark.parametrize("name", ["bert", "encoder_layer"])
def test_decisions_are_cumulative(name):
    """Stage 0 closes everything but CLS; stage 1 would keep everything: nothing reopens."""
    model, batch = make(name), batch_for(name)
    handle = gate(model)
    nn.init.constant_(handle.tokens.scorers[0].linear.bias, -30.0)
    nn.init.constant_(handle.tokens.scorers[1].linear.bias, 30.0)
    model.train()
    output(name, model, batch)
    first, second = handle.token_masks()
    assert torch.equal(second, first)
    assert torch.equal(first.sum(1), torch.ones(first.shape[0], dtype=torch.long))
    model.eval()
    with torch.no_grad():
        output(name, model, batch)
    first, second = handle.token_masks()
    assert bool((second <= first).all()) and bool((second.sum(1) < first.sum(1)).all())


@pytest.mark.parametrize("controller", ["lagrangian", "pi"])
def test_a_controller_drives_the_expected_keep_ratio_to_the_target(controller):
    model, batch = make("encoder_layer"), batch_for("encoder_layer")
    handle = gate(model, token_layers=[0], token_keep_ratio=0.5)
    target = 1.0 - handle.tokens.target_keep_ratio
    control = (LagrangianController(target, lr=0.05) if controller == "lagrangian"
               else PIController(target, kp=1.0, ki=0.1))
    model.train()
    for p in handle.base_parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(handle.gate_parameters(), lr=0.05)
    start = None
    history = []
    for _ in range(150):
        optimizer.zero_grad()
        out = output("encoder_layer", model, batch)
        sparsity = handle.expected_unit_sparsity("tokens")
        start = sparsity.item() if start is None else start
        loss = 1e-3 * out.pow(2).mean() + control.penalty(sparsity)
        loss.backward()
        optimizer.step()
        control.step()
        history.append(handle.expected_keep_ratio("tokens").item())
    assert 1.0 - start > 0.9  # started nearly all kept
    assert abs(sum(history[-20:]) / 20 - 0.5) < 0.05


def test_setting_the_keep_ratio_moves_every_stage_on_its_curve():
    handle = gate(make("bert"), token_keep_ratio=0.5)
    assert handle.tokens.ratios == pytest.approx((0.5 ** 0.5, 0.5))
    handle.tokens.keep_ratio = 0.25
    assert handle.tokens.ratios == pytest.approx((0.5, 0.25)) and handle.tokens.ratios[-1] == 0.25
    assert handle.tokens.sparsity_target() == pytest.approx(1 - (0.5 + 0.25) / 2)
    listed = gate(make("bert"), token_keep_ratio=(0.8, 0.64))
    listed.tokens.keep_ratio = 0.8 ** 4  # the exponent doubles: 0.8 -> 0.8^2
    assert listed.tokens.ratios == pytest.approx((0.64, 0.8 ** 4))
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="keep_ratio must be a fraction in \\(0, 1\\]"):
            handle.tokens.keep_ratio = bad


def test_the_loss_adaptive_controller_moves_the_keep_ratio_down_while_the_loss_falls_up_when_it_rises():
    from learnmask.control import LossAdaptiveController

    handle = gate(make("bert"), token_layers=[0], token_keep_ratio=0.9)
    adaptive = LossAdaptiveController(0.9, r_min=0.5, r_max=1.0, harder="down", max_step=0.05)
    ratios = []
    for loss in [1.0 - 0.05 * i for i in range(12)] + [2.0 + 0.5 * i for i in range(4)]:
        handle.tokens.keep_ratio = adaptive.update(loss)
        ratios.append(handle.tokens.keep_ratio)
    falling = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.5, 0.5, 0.5]  # first loss: level only
    assert ratios == pytest.approx(falling + [0.55, 0.6, 0.65, 0.7])
    assert handle.tokens.target_keep_ratio == pytest.approx(0.7)


def test_a_lagrangian_controller_follows_a_keep_ratio_moved_by_the_loss():
    """The loss-adaptive row: a falling (synthetic) task loss moves the target keep ratio from
    0.9 down to 0.5 over 40 steps; the Lagrangian controller, targeting
    ``tokens.sparsity_target``, drives the expected keep ratio after it."""
    from learnmask.control import LossAdaptiveController

    model, batch = make("encoder_layer"), batch_for("encoder_layer")
    handle = gate(model, token_layers=[0], token_keep_ratio=0.9)
    adaptive = LossAdaptiveController(0.9, r_min=0.5, r_max=1.0, harder="down", max_step=0.01)
    control = LagrangianController(handle.tokens.sparsity_target, lr=0.05)
    model.train()
    for p in handle.base_parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(handle.gate_parameters(), lr=0.05)
    targets, kept = [], []
    for step in range(200):
        optimizer.zero_grad()
        out = output("encoder_layer", model, batch)
        loss = 1e-3 * out.pow(2).mean() + control.penalty(handle.expected_unit_sparsity("tokens"))
        loss.backward()
        optimizer.step()
        control.step()
        handle.tokens.keep_ratio = adaptive.update(1.0 - 0.01 * step)  # falling: harder each step
        assert control.target == pytest.approx(1.0 - handle.tokens.keep_ratio)
        targets.append(handle.tokens.keep_ratio)
        kept.append(handle.expected_keep_ratio("tokens").item())
    assert targets[0] == pytest.approx(0.9) and targets[20] == pytest.approx(0.7)
    assert targets[-1] == pytest.approx(0.5) and targets[40] == pytest.approx(0.5)
    assert kept[0] > 0.9
    assert max(abs(k - t) for k, t in zip(kept[10:41], targets[10:41])) < 0.1  # follows on the way down
    assert abs(sum(kept[-20:]) / 20 - 0.5) < 0.05


# -- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), (0.5,), (0.3, 0.6)])
def test_a_keep_ratio_outside_0_1_or_malformed_is_refused(ratio):
    with pytest.raises(ValueError, match="token_keep_ratio"):
        gate(make("bert"), token_keep_ratio=ratio)


def test_a_pruning_layer_past_the_depth_names_the_depth():
    with pytest.raises(ValueError, match=r"index 3 is past the model's depth; .* has 3 layers, "
                                         r"so tokens can be pruned after layers 0\.\.1"):
        gate(make("bert"), token_layers=[0, 3])
    with pytest.raises(ValueError, match=r"index 2 is its last layer; .* has 3 layers, "
                                         r"so tokens can be pruned after layers 0\.\.1"):
        gate(make("bert"), token_layers=[0, 2])
    with pytest.raises(ValueError, match="token_layers must be strictly increasing; got \\[1, 0\\]"):
        gate(make("bert"), token_layers=[1, 0])
    with pytest.raises(ValueError, match="tokens=True needs token_layers"):
        gate(make("bert"), token_layers=None)
    with pytest.raises(ValueError, match="layer indices >= 0"):
        gate(make("bert"), token_layers=[-1])


def test_other_bad_setups_say_what_was_expected():
    with pytest.raises(ValueError, match="token_gate 'fixed' cannot gate tokens; expected one of"):
        gate(make("bert"), token_gate="fixed")
    refused = make("bert")
    with pytest.raises(ValueError, match="need every layer to attend through learnmask's op"):
        gate(refused, attention="hooks")
    assert not hasattr(refused, "learnmask_gates") and not hasattr(refused, "learnmask_tokens")
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 64, dropout=0.0)
    with pytest.raises(ValueError, match="batch_first=True"):
        gate(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))
    model = make("bert")
    handle = gate(model)
    with pytest.raises(ValueError, match="token_inference must be one of \\['drop', 'mask'\\]; got 'gather'"):
        handle.token_inference = "gather"
    with pytest.raises(ValueError, match="run a forward pass"):
        handle.expected_keep_ratio("tokens")
    batch = batch_for("bert")
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding: no CLS at position 0
    with pytest.raises(ValueError, match="first token of every example .* pad on the right"):
        output("bert", model, batch)


def test_a_causal_model_is_refused_with_the_supported_list():
    import transformers as T

    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4))
    with pytest.raises(ValueError, match="token gates support .* whose first token, CLS, .* is 'gpt2'"):
        gate(gpt2)
    assert not hasattr(gpt2, "learnmask_gates")


def test_the_trainer_callback_drives_tokens_like_heads():
    from learnmask.trainer_callback import GateCallback

    model, batch = make("bert"), batch_for("bert")
    handle = gate(model)
    callback = GateCallback(handle, LagrangianController(0.5))
    assert callback.sparsity == "tokens"
    assert {id(p) for p in callback.gates} == {id(p) for p in handle.tokens.parameters()}
    model.train()
    output("bert", model, batch)
    assert torch.equal(callback.expected_sparsity(), handle.expected_unit_sparsity("tokens"))
    with pytest.raises(ValueError, match=r"sparsity='ffn' is not gated; choose 'parameters' or one of \['tokens'\]"):
        GateCallback(handle, sparsity="ffn")


def test_scorers_train_in_the_gate_group_at_gate_lr_without_weight_decay():
    from learnmask.gates import FixedGate, param_groups
    from learnmask.trainer_callback import GateCallback

    model = make("bert")
    handle = gate(model, heads=True, gates={"heads": FixedGate(torch.ones(LAYERS, HEADS))})
    scorers = {id(p) for p in handle.tokens.parameters()}
    assert len(scorers) == 4 * len(handle.tokens.scorers)  # norm weight, bias; linear weight, bias
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.01, gate_lr=0.3)}
    assert scorers <= {id(p) for p in groups["gates"]["params"]}
    assert not scorers & {id(p) for p in groups["base"]["params"]}
    assert (groups["gates"]["lr"], groups["gates"]["weight_decay"]) == (0.3, 0.0)
    assert (groups["base"]["lr"], groups["base"]["weight_decay"]) == (1e-4, 0.01)
    callback = GateCallback(handle, gate_lr=0.2)
    (group,) = callback.optimizer.param_groups
    assert scorers <= {id(p) for p in group["params"]}
    assert (group["lr"], group["weight_decay"]) == (0.2, 0.0)


def test_head_gates_and_token_gates_together_drop_equals_mask():
    from learnmask.gates import FixedGate

    model, batch = make("bert"), batch_for("bert")
    heads = torch.ones(LAYERS, HEADS)
    heads[1:, :2] = 0.0  # closed heads in the layers after pruning
    handle = gate(model, heads=True, gates={"heads": FixedGate(heads)})
    with torch.no_grad():
        dropped = output("bert", model, batch)
        handle.token_inference = "mask"
        masked = output("bert", model, batch)
        handle.set_gate("heads", FixedGate(torch.ones(LAYERS, HEADS)))
        open_heads = output("bert", model, batch)
    assert (dropped - masked).abs().max().item() <= TOL
    assert (masked - open_heads).abs().max().item() > 10 * TOL  # the head gates did act


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_hardened_gates_train_with_exactly_the_eval_decisions_and_still_teach_the_scorers(name):
    model, batch = make(name), batch_for(name)
    handle = gate(model, token_gate="hard_concrete", token_gate_options={"init_log_alpha": 0.0})
    for scorer in handle.tokens.scorers:  # scores that rank the tokens
        torch.nn.init.normal_(scorer.linear.weight, std=1.0)
    with torch.no_grad():
        handle.token_inference = "mask"
        model.eval()
        output(name, model, batch)
        eval_masks = [m.clone() for m in handle.token_masks()]
        model.train()
        torch.manual_seed(0)
        output(name, model, batch)
        soft_masks = handle.token_masks()
    assert any(not torch.equal(a, b) for a, b in zip(eval_masks, soft_masks))  # sampled gates differ
    handle.tokens.harden()
    model.train()
    for seed in range(3):  # no sampling left: every pass keeps exactly the eval decisions
        torch.manual_seed(seed)
        out = output(name, model, batch)
        assert all(torch.equal(a, b) for a, b in zip(eval_masks, handle.token_masks()))
    expected = handle.expected_keep_ratio("tokens")
    n_real = real_counts(name, batch).double()
    exact = sum(((torch.round(n_real * r).clamp_min(1)) / n_real).mean() for r in handle.tokens.ratios) / 2
    assert float(expected) == pytest.approx(float(exact), abs=1e-6)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for scorer in handle.tokens.scorers:
        assert scorer.linear.weight.grad is not None and scorer.linear.weight.grad.abs().sum() > 0
