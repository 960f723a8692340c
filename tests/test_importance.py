"""Fixed baselines: magnitude and gradient-importance scores by value, random and open masks."""
import pytest
import torch
import zoo

from learnmask.gates import FixedGate
from learnmask.inject import apply_masks
from learnmask.inject.importance import gradient_importance, keep_top, magnitude_scores, set_baseline


def test_magnitude_scores_by_hand():
    model = zoo.make("bert")
    handle = apply_masks(model, heads=True, ffn=True, gate="fixed")
    heads, ffn = magnitude_scores(handle, "heads"), magnitude_scores(handle, "ffn")
    assert heads.shape == (2, 4) and ffn.shape == (2, 64)
    layer = model.bert.encoder.layer[1]
    att, h = layer.attention, 2
    rows = slice(8 * h, 8 * h + 8)
    expected = sum(m.weight[rows].pow(2).sum() for m in (att.self.query, att.self.key, att.self.value))
    expected = expected + att.output.dense.weight[:, rows].pow(2).sum()
    assert heads[1, h].item() == pytest.approx(expected.item(), rel=1e-6)
    unit = layer.intermediate.dense.weight[5].pow(2).sum() + layer.output.dense.weight[:, 5].pow(2).sum()
    assert ffn[1, 5].item() == pytest.approx(unit.item(), rel=1e-6)
    with pytest.raises(ValueError, match="magnitude scores cover 'heads' and 'ffn'; got 'hidden'"):
        magnitude_scores(handle, "hidden")


def test_magnitude_scores_with_grouped_kv_heads():
    model = zoo.make("llama")
    handle = apply_masks(model, heads=True, gate="fixed")
    scores = magnitude_scores(handle, "heads")
    att = model.model.layers[0].self_attn
    q = att.q_proj.weight[8:16].pow(2).sum()  # query head 1 ...
    kv = att.k_proj.weight[0:8].pow(2).sum() + att.v_proj.weight[0:8].pow(2).sum()  # ... shares kv head 0
    o = att.o_proj.weight[:, 8:16].pow(2).sum()
    assert scores[0, 1].item() == pytest.approx((q + kv + o).item(), rel=1e-6)


def test_gradient_importance_equals_finite_differences():
    model = zoo.make("bert").double()  # float64: a single unit's effect is small
    batch = dict(zoo.inputs("bert"), labels=torch.tensor([0, 1, 2]))
    handle = apply_masks(model, heads=True, ffn=True, gate="fixed")
    scores = gradient_importance(handle, [batch, batch])
    assert all(p.grad is None for p in model.parameters())
    assert scores["heads"].shape == (2, 4) and (scores["heads"] > 0).all()
    eps, unit = 1e-4, 7
    losses = []
    for sign in (1, -1):
        values = torch.ones(2, 64, dtype=torch.float64)
        values[0, unit] += sign * eps
        handle.set_gate("ffn", _Constant(values))
        with torch.no_grad():
            losses.append(model(**batch).loss.item())
    derivative = (losses[0] - losses[1]) / (2 * eps)
    assert abs(derivative) > 1e-8
    assert scores["ffn"][0, unit].item() == pytest.approx(2 * abs(derivative), rel=1e-4)  # two equal batches


class _Constant(FixedGate):
    """A gate returning fixed real values (for finite differences only)."""

    def __init__(self, values):
        super().__init__(torch.ones(values.shape))
        self.values = values

    def forward(self):
        return self.values


def test_keep_top_and_set_baseline():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 6.0]])
    assert keep_top(scores, 0.5).tolist() == [[True, False, True, False], [False, True, False, True]]
    assert keep_top(scores, 0.5, per_layer=False).tolist() == [[True, False, False, False], [False, True, True, True]]
    assert keep_top(scores, 0.01).sum(dim=1).tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]; got 0"):
        keep_top(scores, 0)
    model = zoo.make("gpt2")
    handle = apply_masks(model, heads=True, ffn=True)
    masks = set_baseline(handle, "random", {"heads": 0.5, "ffn": 0.25}, generator=torch.Generator().manual_seed(0))
    assert masks["heads"].sum(dim=1).tolist() == [2, 2] and masks["ffn"].sum(dim=1).tolist() == [32, 32]
    assert torch.equal(handle.eval_masks()["heads"], masks["heads"].float())
    again = set_baseline(handle, "random", {"heads": 0.5, "ffn": 0.25}, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(again[k], masks[k]) for k in masks)
    assert all(m.all() for m in set_baseline(handle, "open", 0.1).values())
    magnitude = set_baseline(handle, "magnitude", 0.5)
    assert torch.equal(magnitude["heads"], keep_top(magnitude_scores(handle, "heads"), 0.5))
    with pytest.raises(ValueError, match="unknown baseline 'movement'; known: open, random, magnitude, importance"):
        set_baseline(handle, "movement", 0.5)
    with pytest.raises(ValueError, match="the importance baseline needs batches"):
        set_baseline(handle, "importance", 0.5)
    with pytest.raises(ValueError, match=r"keep_ratio given for \['hidden'\]"):
        set_baseline(handle, "random", {"hidden": 0.5})
