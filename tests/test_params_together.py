"""Issue 14's pieces together: the mask methods (Child-Tuning-F/D, FISH) drive ParameterMasks,
and the masked entries hold at AdamW's update (weight decay, moments) to the last bit."""
import pytest
import torch
from torch import nn

from learnmask.params import ChildTuningF, ParameterMasks, child_tuning_d_masks, empirical_fisher, fish_masks, freeze


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)




@pytest.mark.parametrize("method", ["fish", "child_d"])
def test_fisher_masks_hold_under_adamw_with_weight_decay(method):
    model = _model()
    fisher = empirical_fisher(model, _batches(), _loss)
    masks = fish_masks(fisher, 0.2, always_keep=["2.bias"]) if method == "fish" else child_tuning_d_masks(fisher, 0.2)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ParameterMasks(model, masks).attach(optimizer)
    for batch in _batches(4) * 10:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p[~masks[name]], before[name][~masks[name]])  # masked: bit-identical
        assert bool((p[masks[name]] != before[name][masks[name]]).all())  # kept: every entry moved


def test_child_tuning_f_moves_only_the_entries_drawn_that_step():
    model = _model()
    params = dict(model.named_parameters())
    child = ChildTuningF(params, p=0.3, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    everything = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    target = ParameterMasks(model, everything).attach(optimizer)
    for batch in _batches(6):
        masks, scale = child.step_masks(target)
        assert scale == pytest.approx(1 / 0.3)
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
        for n, p in params.items():
            assert torch.equal(p[~masks[n]], before[n][~masks[n]])


def test_freezing_and_masks_together_leave_frozen_layers_bit_identical():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    frozen = freeze(model, pattern="0.*", optimizer=optimizer)
    assert sorted(frozen.names) == ["0.bias", "0.weight"]
    first = [p.detach().clone() for p in model[0].parameters()]
    for batch in _batches(4) * 5:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), first))
