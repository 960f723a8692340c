"""The empirical Fisher (Child-Tuning-D, Xu et al. 2021; FISH, Sung et al. 2021) against a hand
computation, and FISH masks under a fixed parameter budget."""
import copy

import pytest
import torch
from conftest import tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnmask.params.fish import budget_from_count, fish_masks
from learnmask.params.fisher import empirical_fisher

# A Linear(2, 1) with w = [1, -1], b = 0.5 and the loss 0.5 (y - t)^2 has the closed-form gradient
# r * x for w and r for b, with the residual r = y - t. Four examples (x, t) and their residuals:
#   ([1, 2], 0): y = -0.5, r = -0.5  -> g_w = [-0.5, -1],  g_b = -0.5
#   ([2, 0], 1): y =  2.5, r =  1.5  -> g_w = [ 3,    0],  g_b =  1.5
#   ([0, 1], 0): y = -0.5, r = -0.5  -> g_w = [ 0, -0.5],  g_b = -0.5
#   ([1, 1], 1): y =  0.5, r = -0.5  -> g_w = [-0.5, -0.5], g_b = -0.5
X = torch.tensor([[1.0, 2.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
T = torch.tensor([0.0, 1.0, 0.0, 1.0])
BATCHES = [(X[:2], T[:2]), (X[2:], T[2:])]
# per batch (mean loss): batch 1 g_w = [1.25, -0.5], g_b = 0.5; batch 2 g_w = [-0.25, -0.5], g_b = -0.5
#   F_w = [(1.5625 + 0.0625) / 2, (0.25 + 0.25) / 2] = [0.8125, 0.25], F_b = (0.25 + 0.25) / 2 = 0.25
PER_BATCH = {"weight": torch.tensor([[0.8125, 0.25]]), "bias": torch.tensor([0.25])}
# per example: F_w = [(0.25 + 9 + 0 + 0.25) / 4, (1 + 0 + 0.25 + 0.25) / 4] = [2.375, 0.375],
#   F_b = (0.25 + 2.25 + 0.25 + 0.25) / 4 = 0.75
PER_EXAMPLE = {"weight": torch.tensor([[2.375, 0.375]]), "bias": torch.tensor([0.75])}


def linear():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.fill_(0.5)
    return model


def squared_error(model, batch):
    x, t = batch
    return 0.5 * (model(x).squeeze(-1) - t) ** 2


def mean_squared_error(model, batch):
    return squared_error(model, batch).mean()


def assert_equal(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], expected[name]), (name, got[name], expected[name])


def test_per_batch_fisher_is_the_mean_squared_batch_gradient():
    assert_equal(empirical_fisher(linear(), BATCHES, mean_squared_error), PER_BATCH)


def test_per_example_fisher_is_the_mean_squared_example_gradient():
    assert_equal(empirical_fisher(linear(), BATCHES, squared_error, per_example=True), PER_EXAMPLE)


def test_num_batches_uses_only_the_first_batches():
    # batch 1 alone: F_w = [1.25^2, 0.5^2], F_b = 0.5^2
    got = empirical_fisher(linear(), iter(BATCHES * 100), mean_squared_error, num_batches=1)
    assert_equal(got, {"weight": torch.tensor([[1.5625, 0.25]]), "bias": torch.tensor([0.25])})


def test_with_one_example_per_batch_the_two_estimates_agree():
    singles = [(X[i:i + 1], T[i:i + 1]) for i in range(4)]
    assert_equal(empirical_fisher(linear(), singles, mean_squared_error), PER_EXAMPLE)


def test_parameters_by_name_or_mapping():
    model = linear()
    assert_equal(empirical_fisher(model, BATCHES, mean_squared_error, parameters=["bias"]),
                 {"bias": PER_BATCH["bias"]})
    got = empirical_fisher(model, BATCHES, mean_squared_error, parameters={"w": model.weight})
    assert list(got) == ["w"] and torch.equal(got["w"], PER_BATCH["weight"])


def test_default_skips_frozen_parameters_and_unused_ones_get_zeros():
    model = nn.Sequential(linear(), nn.Linear(3, 3))  # the second Linear is never called
    model[0].bias.requires_grad_(False)
    got = empirical_fisher(model, BATCHES, lambda m, b: mean_squared_error(m[0], b))
    assert list(got) == ["0.weight", "1.weight", "1.bias"]
    assert torch.equal(got["0.weight"], PER_BATCH["weight"])
    assert torch.equal(got["1.weight"], torch.zeros(3, 3)) and torch.equal(got["1.bias"], torch.zeros(3))


def test_grads_are_left_as_they_were():
    model = linear()
    stale = torch.tensor([[7.0, 8.0]])
    model.weight.grad = stale
    empirical_fisher(model, BATCHES, squared_error, per_example=True)
    assert model.weight.grad is stale and torch.equal(stale, torch.tensor([[7.0, 8.0]]))
    assert model.bias.grad is None


def test_computed_in_eval_mode_and_every_mode_restored():
    # Dropout(0.9) in train mode would zero or scale by 10 the output; the hand values still hold
    model = nn.Sequential(linear(), nn.Dropout(0.9)).train()
    assert_equal(empirical_fisher(model, BATCHES, mean_squared_error), {
        "0.weight": PER_BATCH["weight"], "0.bias": PER_BATCH["bias"]})
    assert model.training and model[0].training and model[1].training


def test_normalization_statistics_untouched_and_mixed_modes_restored():
    model = nn.Sequential(nn.BatchNorm1d(2), linear(), nn.Dropout(0.5)).train()
    model[2].eval()
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    got = empirical_fisher(model, BATCHES, mean_squared_error)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats, counter
    assert [m.training for m in model.modules()] == [True, True, True, False]
    expected = empirical_fisher(reference, BATCHES, mean_squared_error)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_low_precision_parameters_accumulate_in_float32():
    # grad_w = x = 1 + 2^-7 (exact in bfloat16); its square 1 + 2^-6 + 2^-14 is exact in float32,
    # while bfloat16 would round it to 1 + 2^-6
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    x = torch.tensor([[1 + 2**-7]], dtype=torch.bfloat16)
    got = empirical_fisher(model, [x], lambda m, b: m(b).sum())
    assert got["weight"].dtype == torch.float32
    assert got["weight"].item() == 1 + 2**-6 + 2**-14


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True, "2"])
def test_num_batches_must_be_a_positive_int(num_batches):
    with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
        empirical_fisher(linear(), BATCHES, mean_squared_error, num_batches=num_batches)


def test_empty_or_short_data_is_an_error():
    with pytest.raises(ValueError, match="batches is empty"):
        empirical_fisher(linear(), [], mean_squared_error)
    with pytest.raises(ValueError, match="num_batches=3 but batches gave only 2"):
        empirical_fisher(linear(), BATCHES, mean_squared_error, num_batches=3)
    with pytest.raises(ValueError, match="held no example"):
        empirical_fisher(linear(), [(X[:0], T[:0])], squared_error, per_example=True)


def test_loss_shape_must_fit_the_estimate():
    with pytest.raises(ValueError, match=r"shape \(2,\) for batch 0; expected a scalar loss"):
        empirical_fisher(linear(), BATCHES, squared_error)
    with pytest.raises(ValueError, match=r"shape \(\) for batch 0; per_example=True expects"):
        empirical_fisher(linear(), BATCHES, mean_squared_error, per_example=True)
    with pytest.raises(TypeError, match="loss_fn returned float"):
        empirical_fisher(linear(), BATCHES, lambda m, b: 1.0)
    with pytest.raises(ValueError, match="does not require grad"):
        empirical_fisher(linear(), BATCHES, lambda m, b: torch.tensor(1.0))


def test_bad_parameters_are_named():
    model, other = linear(), linear()
    with pytest.raises(ValueError, match=r"\['head.weight'\] are not in Linear; its parameters: weight, bias"):
        empirical_fisher(model, BATCHES, mean_squared_error, parameters=["head.weight"])
    with pytest.raises(ValueError, match=r"\['w'\] are not parameters of this Linear"):
        empirical_fisher(model, BATCHES, mean_squared_error, parameters={"w": other.weight})
    with pytest.raises(TypeError, match="wrap it"):
        empirical_fisher(model, BATCHES, mean_squared_error, parameters="bias")
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['bias'\] do not require grad"):
        empirical_fisher(model, BATCHES, mean_squared_error, parameters=["bias"])


def test_non_finite_gradients_are_an_error():
    with pytest.raises(ValueError, match="Fisher of 'weight' is not finite"):
        empirical_fisher(linear(), BATCHES, lambda m, b: mean_squared_error(m, b) * float("inf"))


def test_tiny_bert_per_example_equals_per_batch_on_single_examples():
    model = tiny_bert(num_labels=2, layers=1, heads=2, hidden=16)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(5, 100, (4, 6), generator=g), torch.tensor([0, 1, 1, 0])

    def per_example(m, batch):
        return nn.functional.cross_entropy(m(input_ids=batch[0]).logits, batch[1], reduction="none")

    together = empirical_fisher(model, [(ids, labels)], per_example, per_example=True)
    singles = [(ids[i:i + 1], labels[i:i + 1]) for i in range(4)]
    apart = empirical_fisher(model, singles, lambda m, b: m(input_ids=b[0], labels=b[1]).loss)
    assert list(together) == [n for n, p in model.named_parameters() if p.requires_grad]
    for name, value in together.items():
        torch.testing.assert_close(value, apart[name], rtol=1e-4, atol=1e-9)
    assert together["classifier.weight"].gt(0).all()


# --- FISH masks -------------------------------------------------------------------------------

FISHER = {"a": torch.tensor([[0.5, 3.0], [0.1, 2.0]]), "b": torch.tensor([1.0, 0.2, 4.0]),
          "head": torch.tensor([[0.0, 0.0]])}  # 9 entries


def masks_equal(got, expected):
    assert list(got) == list(expected)
    for name, mask in expected.items():
        assert got[name].dtype == torch.bool and torch.equal(got[name], torch.tensor(mask)), (name, got[name])


def test_fish_keeps_the_largest_fisher_values():
    # round(4/9 * 9) = 4 entries: 4.0, 3.0, 2.0, 1.0
    masks_equal(fish_masks(FISHER, 4 / 9), {"a": [[False, True], [False, True]], "b": [True, False, True],
                                            "head": [[False, False]]})


def test_fish_head_counts_inside_the_budget():
    # 4 entries in all, 2 of them the head: only 4.0 and 3.0 remain
    masks_equal(fish_masks(FISHER, 4 / 9, always_keep=["head"]), {
        "a": [[False, True], [False, False]], "b": [False, False, True], "head": [[True, True]]})
    masks_equal(fish_masks(FISHER, 2 / 9, always_keep="head"), {  # the head fills the budget exactly
        "a": [[False, False], [False, False]], "b": [False, False, False], "head": [[True, True]]})


def test_fish_head_larger_than_the_budget_is_an_error_with_numbers():
    with pytest.raises(ValueError, match=r"holds 2 entries, more than the budget: round\(0.1 \* 9\) = 1"):
        fish_masks(FISHER, 0.1, always_keep=["head"])


def test_fish_ties_keep_the_earlier_entries():
    masks_equal(fish_masks({"x": torch.ones(3), "y": torch.ones(2)}, 0.6), {"x": [True] * 3, "y": [False] * 2})
    masks_equal(fish_masks({"y": torch.ones(2), "x": torch.ones(3)}, 0.6), {"y": [True] * 2, "x": [True, False, False]})


def test_fish_rounds_half_to_even():
    fisher = {"w": torch.arange(10.0)}
    assert int(fish_masks(fisher, 0.25)["w"].sum()) == 2  # round(2.5) = 2
    assert int(fish_masks(fisher, 0.35)["w"].sum()) == 4  # round(3.5) = 4


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2), min_size=1, max_size=4),
       budget=st.floats(0.0, 1.0, exclude_min=True), head=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_fish_counts_are_exact_and_the_kept_entries_dominate(shapes, budget, head, seed):
    g = torch.Generator().manual_seed(seed)
    fisher = {f"p{i}": torch.randint(0, 5, s, generator=g).float() for i, s in enumerate(shapes)}  # many ties
    keep = list(fisher)[:head]
    total = sum(f.numel() for f in fisher.values())
    count, whole = round(budget * total), sum(fisher[n].numel() for n in keep)
    if count < 1 or whole > count:
        with pytest.raises(ValueError):
            fish_masks(fisher, budget, always_keep=keep)
        return
    masks = fish_masks(fisher, budget, always_keep=keep, parameters=fisher)
    assert sum(int(m.sum()) for m in masks.values()) == count
    assert all(masks[n].all() for n in keep)
    rest = [n for n in fisher if n not in keep]
    kept = torch.cat([fisher[n][masks[n]] for n in rest] + [torch.tensor([float("inf")])])
    dropped = torch.cat([fisher[n][~masks[n]] for n in rest] + [torch.tensor([-float("inf")])])
    assert kept.min() >= dropped.max()


@settings(max_examples=100, deadline=None)
@given(total=st.integers(1, 2**40), data=st.data())
def test_budget_from_count_keeps_exactly_that_count(total, data):
    count = data.draw(st.integers(1, total))
    budget = budget_from_count(count, total)
    assert 0 < budget <= 1 and round(budget * total) == count


def test_budget_from_count_reads_a_mapping_and_checks_its_count():
    assert budget_from_count(3, FISHER) == 3 / 9
    assert sum(int(m.sum()) for m in fish_masks(FISHER, budget_from_count(5, FISHER)).values()) == 5
    for bad in (0, 10, 2.0):
        with pytest.raises(ValueError, match=r"count must be an int in \[1, total\] = \[1, 9\]"):
            budget_from_count(bad, FISHER)
    with pytest.raises(ValueError, match="total must be an int >= 1"):
        budget_from_count(1, 0)


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.01, float("nan"), True, "0.5"])
def test_fish_budget_outside_0_1_is_an_error(budget):
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
        fish_masks(FISHER, budget)


def test_fish_budget_keeping_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"keeps round\(0.5\) = 0"):  # half to even
        fish_masks(FISHER, 1 / 18)
    with pytest.raises(ValueError, match=r"budget=0.05 of 9 entries keeps round\(0.45\) = 0"):
        fish_masks(FISHER, 0.05)


def test_fish_bad_names_shapes_and_empty_fisher():
    with pytest.raises(ValueError, match=r"always_keep names \['classifier.weight'\] are not in fisher; its names: a"):
        fish_masks(FISHER, 0.5, always_keep=["classifier.weight"])
    with pytest.raises(ValueError, match="fisher must be a non-empty"):
        fish_masks({}, 0.5)
    params = {"a": torch.zeros(2, 2), "b": torch.zeros(3), "head": torch.zeros(2, 1)}
    with pytest.raises(ValueError, match=r"fisher\['head'\] has shape \(1, 2\); the parameter has shape \(2, 1\)"):
        fish_masks(FISHER, 0.5, parameters=params)
    with pytest.raises(ValueError, match=r"missing from fisher \['c'\], not among the parameters \['head'\]"):
        fish_masks(FISHER, 0.5, parameters={"a": params["a"], "b": params["b"], "c": params["head"]})
    with pytest.raises(ValueError, match=r"fisher\['a'\] contains NaN"):
        fish_masks({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match=r"fisher\['a'\] must be a real tensor; got list"):
        fish_masks({"a": [1.0, 2.0]}, 0.5)


def test_fish_on_tiny_bert_with_the_classifier_inside_the_budget():
    model = tiny_bert(num_labels=2, layers=1, heads=2, hidden=16)
    ids = torch.randint(5, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i:i + 1], "labels": torch.tensor([i % 2])} for i in range(3)]
    fisher = empirical_fisher(model, batches, lambda m, b: m(**b).loss)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    head = ["classifier.weight", "classifier.bias"]
    masks = fish_masks(fisher, 0.05, always_keep=head, parameters=params)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * total)
    assert masks["classifier.weight"].all() and masks["classifier.bias"].all()
    assert all(masks[n].shape == p.shape and masks[n].device == p.device for n, p in params.items())
