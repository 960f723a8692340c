"""Child-Tuning (Xu et al. 2021): task-free Bernoulli masks with 1/p scaling (F) and the task-driven
top-p of the Fisher information (D)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from learnmask.params.child_tuning import ChildTuningF, child_tuning_d_masks

PARAMS = {"w": nn.Parameter(torch.zeros(4, 5)), "b": nn.Parameter(torch.zeros(3)), "s": nn.Parameter(torch.zeros(()))}


class Recorder:
    """A stand-in for ParameterMasks: records what it is asked to enforce."""

    def __init__(self):
        self.calls = []

    def set_masks(self, masks, grad_scale=None):
        self.calls.append((masks, grad_scale))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# --- Child-Tuning-F ---------------------------------------------------------------------------

def test_f_masks_have_the_parameters_names_shapes_and_bool_dtype():
    masks, scale = ChildTuningF(PARAMS, 0.5, seeded()).sample()
    assert list(masks) == ["w", "b", "s"] and scale == 2.0
    assert all(masks[n].dtype == torch.bool and masks[n].shape == p.shape for n, p in PARAMS.items())


def test_f_keeps_entries_whose_uniform_draw_is_below_p():
    # the draw order is the parameters' order, row-major: the mask is exactly rand < p
    uniform = torch.rand(24, generator=seeded(3))
    masks, _ = ChildTuningF(PARAMS, 0.3, seeded(3)).sample()
    flat = torch.cat([masks[n].reshape(-1) for n in PARAMS])
    assert torch.equal(flat, uniform < 0.3)


def test_f_is_reproducible_with_a_seeded_generator_and_fresh_each_step():
    first, second = ChildTuningF(PARAMS, 0.5, seeded(7)), ChildTuningF(PARAMS, 0.5, seeded(7))
    draws = [first.sample()[0] for _ in range(3)]
    for masks in draws:
        again, _ = second.sample()
        assert all(torch.equal(masks[n], again[n]) for n in PARAMS)
    assert not torch.equal(draws[0]["w"], draws[1]["w"])  # 2^-20 chance of equal draws; fixed seed


def test_f_without_a_generator_follows_the_global_seed():
    torch.manual_seed(11)
    a, _ = ChildTuningF(PARAMS, 0.5).sample()
    torch.manual_seed(11)
    b, _ = ChildTuningF(PARAMS, 0.5).sample()
    assert all(torch.equal(a[n], b[n]) for n in PARAMS)


@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.02, 1.0), seed=st.integers(0, 2**16))
def test_f_scale_is_exactly_one_over_p_and_the_keep_rate_is_binomial(p, seed):
    sampler = ChildTuningF(PARAMS, p, seeded(seed))
    kept, n = 0, 0
    for _ in range(200):
        masks, scale = sampler.sample()
        assert scale == 1 / p
        kept += sum(int(m.sum()) for m in masks.values())
        n += sum(m.numel() for m in masks.values())
    # Binomial(n = 4800, p): 6 standard deviations (plus one for p near 1, where the sd vanishes)
    assert abs(kept - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1


def test_f_each_entry_is_kept_at_rate_p_so_the_scaled_gradient_is_unbiased():
    sampler = ChildTuningF({"w": torch.zeros(6)}, 0.25, seeded(5))
    kept = sum(sampler.sample()[0]["w"].float() for _ in range(4000))
    rate = kept / 4000  # per entry: Binomial(4000, 0.25) / 4000, sd = 0.0068
    assert (rate - 0.25).abs().max() <= 6 * math.sqrt(0.25 * 0.75 / 4000)
    assert ((rate * sampler.grad_scale) - 1).abs().max() <= 0.17  # E[mask / p] = 1


def test_f_p_one_keeps_everything_unscaled():
    masks, scale = ChildTuningF(PARAMS, 1.0, seeded()).sample()
    assert scale == 1.0 and all(m.all() for m in masks.values())


def test_f_step_masks_hands_the_masks_and_one_over_p_to_its_target():
    target = Recorder()
    returned = ChildTuningF(PARAMS, 0.4, seeded(2)).step_masks(target)
    expected, _ = ChildTuningF(PARAMS, 0.4, seeded(2)).sample()
    (masks, scale), = target.calls
    assert scale == 1 / 0.4 and returned[1] == scale and returned[0] is masks
    assert all(torch.equal(masks[n], expected[n]) for n in PARAMS)


@pytest.mark.parametrize("p", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_f_p_outside_0_1_is_an_error(p):
    with pytest.raises(ValueError, match=r"p must be a fraction in \(0, 1\]"):
        ChildTuningF(PARAMS, p)


def test_f_bad_parameters_or_generator():
    with pytest.raises(ValueError, match="non-empty name -> parameter mapping"):
        ChildTuningF({}, 0.5)
    with pytest.raises(ValueError, match="non-empty name -> parameter mapping"):
        ChildTuningF(list(PARAMS.values()), 0.5)
    with pytest.raises(ValueError, match=r"\['x'\] are not tensors"):
        ChildTuningF({"x": [1.0]}, 0.5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ChildTuningF(PARAMS, 0.5, generator=0)


# --- Child-Tuning-D ---------------------------------------------------------------------------

FISHER = {"a": torch.tensor([[0.5, 3.0], [0.1, 2.0]]), "b": torch.tensor([1.0, 0.2, 4.0])}  # 7 entries


def test_d_keeps_the_top_fraction_over_all_parameters_jointly():
    # round(0.5 * 7) = 4 (half to even): 4.0, 3.0, 2.0, 1.0 across both tensors
    masks = child_tuning_d_masks(FISHER, 0.5)
    assert torch.equal(masks["a"], torch.tensor([[False, True], [False, True]]))
    assert torch.equal(masks["b"], torch.tensor([True, False, True]))
    # round(2 / 7 * 7) = 2: 4.0 in "b" and 3.0 in "a"
    masks = child_tuning_d_masks(FISHER, 2 / 7)
    assert torch.equal(masks["a"], torch.tensor([[False, True], [False, False]]))
    assert torch.equal(masks["b"], torch.tensor([False, False, True]))


def test_d_breaks_ties_by_order_and_keeps_the_exact_count():
    masks = child_tuning_d_masks({"x": torch.zeros(2, 2), "y": torch.zeros(3)}, 0.4)  # round(2.8) = 3
    assert torch.equal(masks["x"], torch.tensor([[True, True], [True, False]]))
    assert not masks["y"].any()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4), keep=st.floats(0.0, 1.0, exclude_min=True),
       seed=st.integers(0, 2**16))
def test_d_count_is_exact_and_matches_the_reference_percentile_rule_without_ties(sizes, keep, seed):
    g = torch.Generator().manual_seed(seed)
    total, count = sum(sizes), round(keep * sum(sizes))
    distinct = torch.randperm(total, generator=g).float().split(sizes)
    fisher = {f"p{i}": values for i, values in enumerate(distinct)}
    if count < 1:
        with pytest.raises(ValueError, match="keep="):
            child_tuning_d_masks(fisher, keep)
        return
    masks = child_tuning_d_masks(fisher, keep)
    assert sum(int(m.sum()) for m in masks.values()) == count
    # the reference code keeps fisher >= its percentile threshold; with distinct values and the
    # count-th largest value as the threshold that is the same set (here: values >= total - count)
    assert all(torch.equal(masks[n], fisher[n] >= total - count) for n in fisher)


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("inf"), False])
def test_d_keep_outside_0_1_is_an_error(keep):
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        child_tuning_d_masks(FISHER, keep)


def test_d_bad_fisher():
    with pytest.raises(ValueError, match="keep=0.05 of 7 entries keeps round"):
        child_tuning_d_masks(FISHER, 0.05)
    with pytest.raises(ValueError, match="fisher must be a non-empty"):
        child_tuning_d_masks({}, 0.5)
    with pytest.raises(ValueError, match=r"fisher\['b'\] has shape \(3,\); the parameter has shape \(4,\)"):
        child_tuning_d_masks(FISHER, 0.5, parameters={"a": torch.zeros(2, 2), "b": torch.zeros(4)})
