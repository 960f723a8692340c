"""freeze / unfreeze / GradualUnfreezing: case P1 with its exact numbers (../shared/cases/CASES.md),
frozen norm statistics, no weight decay on frozen parameters, unfreezing into the group they left,
ULMFiT's top-down order on a tiny BERT, and the errors."""
import logging

import pytest
import torch
from torch import nn

from learnmask.params import FrozenParameters, GradualUnfreezing, freeze
from tests.conftest import tiny_bert


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))
        self.v = nn.Parameter(torch.tensor([1.0]))


def first_step():
    """SGD(lr 0.1, momentum 0.9), w = 1, gradient 1: one step gives w = 0.9 (momentum buffer 1)."""
    model = Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.w.grad = torch.ones(1)
    optimizer.step()
    assert model.w.item() == pytest.approx(0.9, abs=1e-7)
    return model, optimizer


def test_p1_a_frozen_weight_stays_exactly_where_it_was():
    model, optimizer = first_step()
    after_one = model.w.detach().clone()
    frozen = freeze(model, pattern="w", optimizer=optimizer)
    assert model.w.grad is None and not model.w.requires_grad
    assert model.w not in optimizer.state
    assert all(p is not model.w for group in optimizer.param_groups for p in group["params"])
    optimizer.step()
    assert torch.equal(model.w.detach(), after_one)
    model.w.grad = torch.ones(1)  # a stale gradient put back by hand
    optimizer.step()
    assert torch.equal(model.w.detach(), after_one)
    assert frozen.names == ["w"]


def test_p1_the_faulty_results_requires_grad_alone_gives():
    # 0.71 from the stale gradient (buffer 0.9 * 1 + 1 = 1.9), 0.81 from momentum on a zeroed one
    model, optimizer = first_step()
    model.w.requires_grad_(False)
    optimizer.step()
    assert model.w.item() == pytest.approx(0.71, abs=1e-6)
    model, optimizer = first_step()
    model.w.requires_grad_(False)
    model.w.grad.zero_()
    optimizer.step()
    assert model.w.item() == pytest.approx(0.81, abs=1e-6)


X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


def test_p1_a_frozen_batchnorm_keeps_its_running_statistics_in_train_mode():
    model = nn.Sequential(nn.BatchNorm1d(2))
    frozen = freeze(model, pattern="0.*")
    assert frozen.norms == ["0"]
    model.train()
    out = model(X)
    assert torch.equal(model[0].running_mean, torch.zeros(2))
    assert torch.equal(model[0].running_var, torch.ones(2))
    assert int(model[0].num_batches_tracked) == 0
    assert torch.allclose(out, X / (1 + 1e-5) ** 0.5)  # normalized with the running statistics


def test_an_unfrozen_batchnorm_updates_them():
    # the control: momentum 0.1 moves running_mean to 0.1 * the batch mean [2, 3]
    model = nn.Sequential(nn.BatchNorm1d(2))
    frozen = freeze(model, pattern="0.*")
    frozen.unfreeze()
    assert frozen.norms == []
    model.train()
    model(X)
    assert torch.allclose(model[0].running_mean, torch.tensor([0.2, 0.3]))


def test_remove_frees_the_statistics_and_restores_the_mode():
    model = nn.Sequential(nn.BatchNorm1d(2)).train()
    frozen = freeze(model, pattern="0.*")
    model(X)
    frozen.remove()
    assert model[0].training
    model(X)
    assert torch.allclose(model[0].running_mean, torch.tensor([0.2, 0.3]))
    assert model[0].weight.requires_grad


def test_a_norm_without_parameters_follows_its_parent():
    def model():
        return nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)), nn.Linear(2, 1))

    assert freeze(model(), pattern="0.*").norms == ["0.1"]
    assert freeze(model(), pattern="0.0.weight").norms == []  # its parent's bias still trains


def test_adamw_weight_decay_does_not_touch_a_frozen_parameter():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)

    def step():
        optimizer.zero_grad()
        (model(torch.randn(3, 4)) ** 2).sum().backward()
        optimizer.step()

    for _ in range(3):
        step()  # Adam moments built before freezing
    before, bias_before = model.weight.detach().clone(), model.bias.detach().clone()
    freeze(model, pattern="weight", optimizer=optimizer)
    for _ in range(50):
        step()
    assert torch.equal(model.weight.detach(), before)
    assert (model.bias != bias_before).all()


def two_group_sgd(model):
    return torch.optim.SGD([{"params": [model.w], "lr": 0.1, "weight_decay": 0.1},
                            {"params": [model.v], "lr": 0.01}], lr=0.5)


def test_unfreeze_returns_to_the_group_it_left_with_its_hyperparameters():
    # hand step of SGD from w = 1 with gradient 1: group 0 (lr 0.1, weight decay 0.1) gives
    # 1 - 0.1 * (1 + 0.1 * 1) = 0.89; group 1 (lr 0.01) would give 0.99, the defaults (lr 0.5) 0.5
    model = Scalar()
    optimizer = two_group_sgd(model)
    frozen = freeze(model, pattern="w", optimizer=optimizer)
    assert [len(group["params"]) for group in optimizer.param_groups] == [0, 1]  # the group stays
    assert frozen.unfreeze(pattern="w") == ["w"]
    assert model.w.requires_grad
    assert optimizer.param_groups[0]["params"] == [model.w]
    model.w.grad = torch.ones(1)
    optimizer.step()
    assert model.w.item() == pytest.approx(0.89, abs=1e-7)


def test_attach_later_and_a_parameter_never_in_the_optimizer(caplog):
    model = Scalar()
    frozen = freeze(model, pattern="w")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    frozen.attach(optimizer)
    with caplog.at_level(logging.WARNING, logger="learnmask.params.freeze"):
        frozen.unfreeze()
    assert "1 unfrozen parameters were in no group of SGD (w, ...)" in caplog.text
    assert [group["params"] for group in optimizer.param_groups] == [[model.v], [model.w]]
    assert optimizer.param_groups[1]["lr"] == 0.5


def test_attach_removes_the_frozen_and_refuses_a_second_attach():
    model = Scalar()
    optimizer = two_group_sgd(model)
    frozen = freeze(model, pattern="v").attach(optimizer)
    assert optimizer.param_groups[1]["params"] == []
    with pytest.raises(ValueError, match="this SGD is already attached"):
        frozen.attach(optimizer)


def test_remove_restores_requires_grad_and_the_optimizer():
    model = Scalar()
    model.v.requires_grad_(False)  # frozen before learnmask: stays so after remove
    optimizer = two_group_sgd(model)
    frozen = freeze(model, pattern="*", optimizer=optimizer)
    frozen.remove()
    assert model.w.requires_grad and not model.v.requires_grad
    assert [group["params"] for group in optimizer.param_groups] == [[model.w], [model.v]]
    assert frozen.names == []


def test_freezing_clears_stale_gradients_and_blocks_new_ones():
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    freeze(model, pattern="weight")
    assert model.weight.grad is None and model.bias.grad is not None
    model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is None


def test_freeze_errors():
    model = Scalar()
    with pytest.raises(ValueError, match="at least one of layers=, pattern=, predicate="):
        freeze(model)
    with pytest.raises(ValueError, match="pattern 'u' matches no parameter of Scalar"):
        freeze(model, pattern="u")
    assert model.w.requires_grad  # nothing frozen by a failed call
    frozen = freeze(model, pattern="w")
    with pytest.raises(ValueError, match=r"the selection \(\['v'\], ...\) holds no frozen parameter; frozen now: "
                                         r"\['w'\]"):
        frozen.unfreeze(pattern="v")


@pytest.fixture
def bert():
    return tiny_bert(layers=2)


def layer_names(model, *prefixes):
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def test_gradual_unfreezing_goes_top_down_on_a_tiny_bert(bert):
    optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-3)
    frozen = freeze(bert, pattern="bert.*", optimizer=optimizer)  # the classifier head trains from the start
    schedule = GradualUnfreezing(frozen, every=1, unit="epoch")
    assert schedule.schedule() == [(1, "layer 1"), (2, "layer 0"), (3, "below layer 0")]
    assert schedule.step(0) == []
    top = schedule.step(1)
    assert top == layer_names(bert, "bert.encoder.layer.1.", "bert.pooler.")  # the pooler joins the top layer
    assert all(p.requires_grad for n, p in bert.named_parameters() if n in top)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 2 + len(top)
    assert schedule.step(2) == layer_names(bert, "bert.encoder.layer.0.")
    assert schedule.step(3) == layer_names(bert, "bert.embeddings.")
    assert schedule.step(10) == []
    assert frozen.names == []
    assert all(p.requires_grad for p in bert.parameters())


def test_gradual_unfreezing_every_two_steps_bottom_up(bert):
    frozen = freeze(bert, layers=[0, 1])
    schedule = GradualUnfreezing(frozen, order="bottom_up", every=2, unit="step")
    assert schedule.schedule() == [(2, "layer 0"), (4, "layer 1")]
    assert schedule.step(1) == []
    assert schedule.step(3) == layer_names(bert, "bert.encoder.layer.0.")
    assert frozen.names == layer_names(bert, "bert.encoder.layer.1.")


def test_gradual_unfreezing_resumes_by_jumping(bert):
    frozen = freeze(bert, pattern="bert.*")
    schedule = GradualUnfreezing(frozen)
    assert schedule.step(2) == layer_names(bert, "bert.encoder.layer.", "bert.pooler.")  # top two units at once
    with pytest.raises(ValueError, match="epoch 1 after epoch 2: gradual unfreezing only moves forward"):
        schedule.step(1)


@pytest.mark.parametrize("kwargs, message", [({"order": "sideways"}, "order 'sideways' is not"),
                                             ({"unit": "batch"}, "unit 'batch' is not 'epoch' or 'step'"),
                                             ({"every": 0}, "every=0; expected an integer >= 1"),
                                             ({"every": 1.5}, "every=1.5"), ({"every": True}, "every=True")])
def test_gradual_unfreezing_argument_errors(bert, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradualUnfreezing(freeze(bert, layers=0), **kwargs)


def test_gradual_unfreezing_step_and_model_errors(bert):
    schedule = GradualUnfreezing(freeze(bert, layers=0))
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="expected an integer >= 0"):
            schedule.step(bad)
    with pytest.raises(ValueError, match="no transformer layers found in Linear"):
        GradualUnfreezing(freeze(nn.Linear(2, 2), pattern="*"))
    with pytest.raises(ValueError, match="nothing is frozen in BertForSequenceClassification"):
        GradualUnfreezing(FrozenParameters(bert))
