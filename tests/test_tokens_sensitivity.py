"""experiments/tokens_sensitivity.py: its pixel rules keep exactly the brightest (darkest)
patches, and its paired differences against random are the per-image means."""
import pytest
import torch

from learnmask.inject import apply_masks
from learnmask.recipe.token_tasks import Examples, vit_classifier
from tests.conftest import load_script


@pytest.fixture(scope="module")
def sensitivity():
    return load_script("experiments/tokens_sensitivity.py")


@pytest.mark.parametrize("rule, sign", [("foreground", 1.0), ("background", -1.0)])
def test_the_pixel_rules_keep_exactly_the_brightest_or_darkest_patches(sensitivity, rule, sign):
    torch.manual_seed(0)
    model = vit_classifier(2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    pixels = torch.zeros(2, 1, 28, 28)
    levels = torch.randperm(49).float() / 49  # a distinct level per patch, per image
    for index in range(49):
        row, col = divmod(index, 7)
        pixels[0, 0, 4 * row:4 * row + 4, 4 * col:4 * col + 4] = levels[index]
        pixels[1, 0, 4 * row:4 * row + 4, 4 * col:4 * col + 4] = 1 - levels[index]
    handle = apply_masks(model, heads=False, tokens=True, token_layers=[0], token_keep_ratio=0.5, token_gate="topk")
    scorer = sensitivity.make_scorer(rule, model, 0, seed=0)
    handle.tokens.scorers[0] = scorer
    sensitivity.correct(model, pixels, torch.zeros(2, dtype=torch.long), scorer)
    kept = handle.token_masks()[0]
    for image, patch_levels in enumerate((levels, 1 - levels)):
        chosen = (sign * patch_levels).topk(round(0.5 * 50) - 1).indices + 1  # CLS kept, then 24 patches
        expected = torch.zeros(50, dtype=torch.bool)
        expected[0], expected[chosen] = True, True
        assert torch.equal(kept[image], expected)


def test_probe_reports_paired_differences_against_random(sensitivity, monkeypatch):
    outcomes = {"random": [1, 1, 0, 0], "attention": [1, 1, 0, 0], "foreground": [1, 1, 1, 0],
                "background": [0, 0, 0, 0]}
    calls = []

    def fake_correct(model, images, labels, scorer):
        rule = calls[-1]
        return torch.tensor(outcomes[rule], dtype=torch.bool)

    def fake_scorer(rule, model, layer, seed):
        calls.append(rule)
        return torch.nn.Identity()

    monkeypatch.setattr(sensitivity, "correct", fake_correct)
    monkeypatch.setattr(sensitivity, "make_scorer", fake_scorer)
    monkeypatch.setattr(sensitivity, "LAYERS", (0,))
    monkeypatch.setattr(sensitivity, "KEEP_RATIOS", (0.5,))
    model = vit_classifier(2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    rows = {r["rule"]: r for r in sensitivity.probe(model, Examples(torch.zeros(4, 1, 28, 28), torch.zeros(4)), 0)}
    assert rows["foreground"]["accuracy"] == 75.0 and rows["foreground"]["minus_random"] == 25.0
    # per-image differences (0, 0, 1, 0): sample sd 0.5, so the half-width is 1.96 * 0.5 / 2 points x 100
    assert rows["foreground"]["minus_random_ci95"] == pytest.approx(100 * 1.96 * 0.5 / 2)
    assert rows["background"]["minus_random"] == -50.0 and rows["random"]["minus_random"] == 0.0


def test_a_seed_the_grid_does_not_have_is_refused_with_the_grids_seeds(sensitivity, tmp_path):
    with pytest.raises(SystemExit, match=r"no keep-1.0 fashion-vit row for seed 5 \(its seeds: \[0, 1, 2\]\)"):
        sensitivity.main(["--seed", "5", "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_an_out_path_that_cannot_be_a_file_is_refused_before_any_compute(sensitivity, tmp_path):
    with pytest.raises(SystemExit, match="is a directory; expected a JSON file path"):
        sensitivity.main(["--out", str(tmp_path)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a directory"):
        sensitivity.main(["--out", str(tmp_path / "file" / "s.json")])


def test_a_cache_file_of_other_weights_is_refused_naming_it(sensitivity, tmp_path, monkeypatch):
    tiny = vit_classifier(2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    monkeypatch.setattr(sensitivity, "load_task", lambda cfg: type("Data", (), {"model": tiny})())
    _, cfg = sensitivity.dense_cell(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"foo": torch.zeros(1)}, cache / f"dense-{cfg.dense_key()}.pt")
    with pytest.raises(SystemExit, match=rf"dense-{cfg.dense_key()}.pt does not hold the grid's dense ViT"):
        sensitivity.load_dense(cfg, tmp_path)
