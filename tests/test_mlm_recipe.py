"""The continued-MLM recipe: a tiny BERT on the real Shakespeare chunks (fast), exact resume,
the same warmed head for every row, the table and the CLI; and one slow run on real MiniLM."""
import json
import pathlib

import pytest
import torch
from tokenizers_for_tests import minilm_tokenizer

from learnmask.cli import main
from learnmask.recipe import mlm
from learnmask.recipe.config import load_grid
from learnmask.recipe.mlm_config import MLMRunConfig
from learnmask.recipe.mlm_data import batch_indices, chunk_play, heldout_batch
from learnmask.recipe.mlm_table import summarize_mlm

TINY = dict(steps=4, batch_size=2, max_length=16, eval_chunks=4, head_warmup_steps=2, checkpoint_every=2, lr=1e-3)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """A folder with a 1-layer BertForMaskedLM (hidden 16) and MiniLM's tokenizer."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = minilm_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny(path, **changes):
    return MLMRunConfig(model_path=path, **{**TINY, **changes})


def test_chunks_are_cls_body_sep_with_word_ids():
    tokenizer = minilm_tokenizer()
    chunks = chunk_play(tokenizer, "To be, or not to be: that is the question. " * 20, 16)
    assert chunks.input_ids.shape[1] == 16 and len(chunks) >= 10
    assert torch.all(chunks.input_ids[:, 0] == tokenizer.cls_token_id)
    assert torch.all(chunks.input_ids[:, -1] == tokenizer.sep_token_id)
    assert torch.all(chunks.word_ids[:, 0] == -1) and torch.all(chunks.word_ids[:, 1] == 0)


def test_heldout_set_is_fixed_and_batches_are_a_function_of_the_step():
    tokenizer = minilm_tokenizer()
    from learnmask.masks.inputs import MaskingVocab

    vocab = MaskingVocab.from_tokenizer(tokenizer)
    chunks = chunk_play(tokenizer, "Now is the winter of our discontent made glorious summer. " * 40, 16)
    first = heldout_batch(chunks, vocab, count=8, rate=0.15, seed=1234)
    again = heldout_batch(chunks, vocab, count=8, rate=0.15, seed=1234)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and (first[1] != -100).any()
    assert torch.equal(batch_indices(100, 8, 13, seed=0), batch_indices(100, 8, 13, seed=0))
    epoch = torch.cat([batch_indices(100, 8, step, seed=0) for step in range(12)])
    assert len(set(epoch.tolist())) == 96  # one epoch visits distinct chunks
    with pytest.raises(ValueError, match="eval_chunks is 999"):
        heldout_batch(chunks, vocab, count=999, rate=0.15, seed=0)


def test_tiny_run_learns_and_resume_is_exact(tiny_model_path, tmp_path):
    cfg = tiny(tiny_model_path, schedule="adaptive", rate_max=0.4, adaptive_max_step=0.05)
    whole = mlm.fit_mlm(cfg, tmp_path / "whole", cache_dir=tmp_path / "cache")
    assert len(whole["mlm_probability_trajectory"]["rate"]) == 4
    assert 0.15 <= whole["final_mlm_probability"] <= 0.4

    class Interrupt:
        total, count = None, 0

        def update(self, n=1):
            self.count += n
            if self.count == 3:  # after step 3; the checkpoint of step 2 is on disk
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mlm.fit_mlm(cfg, tmp_path / "split", cache_dir=tmp_path / "cache", progress=Interrupt())
    assert (tmp_path / "split" / "checkpoint.pt").exists()
    resumed = mlm.fit_mlm(cfg, tmp_path / "split", cache_dir=tmp_path / "cache")
    for name in ("heldout_accuracy", "heldout_loss", "final_mlm_probability", "mlm_probability_trajectory"):
        assert resumed[name] == whole[name], name
    assert not (tmp_path / "split" / "checkpoint.pt").exists()


def test_every_row_starts_from_the_same_cached_head(tiny_model_path, tmp_path):
    constant = mlm.fit_mlm(tiny(tiny_model_path), tmp_path / "a", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("mlm-head-*.pt"))) == 1
    decay = mlm.fit_mlm(tiny(tiny_model_path, schedule="linear", mlm_probability=0.3), tmp_path / "b",
                        cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("mlm-head-*.pt"))) == 1
    assert decay["heldout_accuracy_before"] == constant["heldout_accuracy_before"]
    rates = decay["mlm_probability_trajectory"]["rate"]
    assert rates == pytest.approx([0.3, 0.25, 0.2, 0.15])  # final rate at the last step
    fresh = mlm.fit_mlm(tiny(tiny_model_path), tmp_path / "c", cache_dir=tmp_path / "other-cache")
    assert fresh["heldout_loss"] == constant["heldout_loss"]  # a cached head gives the same run as a fresh warm-up


def record(row, seed, accuracy, loss=3.0):
    metrics = {"heldout_accuracy": accuracy, "heldout_loss": loss,
               "heldout_accuracy_before": 0.1, "heldout_loss_before": 6.0,
               "final_mlm_probability": 0.15, "mean_mlm_probability": 0.2, "steps": 60, "masked_tokens": 2900}
    return {"grid": "mlm", "row": row, "key": f"{row}-{seed}", "config": {"seed": seed}, "metrics": metrics}


GRID = ('name = "mlm"\nrecipe = "mlm"\ntitle = "T"\nseeds = [0, 1]\n'
        '[[rows]]\nlabel = "15%"\n[[rows]]\nlabel = "40%"\nmlm_probability = 0.4\n')


def test_table_pairs_seeds_against_the_first_row(tmp_path):
    path = tmp_path / "mlm.toml"
    path.write_text(GRID)
    records = [record("15%", 0, 0.30), record("15%", 1, 0.40), record("40%", 0, 0.32), record("40%", 1, 0.43)]
    first, second = summarize_mlm(load_grid(path), records)
    assert (first.row, first.accuracy, first.delta) == ("15%", pytest.approx(35.0), pytest.approx(0.0))
    assert second.delta == pytest.approx(2.5) and second.delta_ci == pytest.approx(0.5 * 12.7062, rel=1e-4)
    assert second.accuracy_ci == pytest.approx(5.5 * 12.7062, rel=1e-4)  # unpaired spread is much wider


def test_reproduce_and_table_commands_for_mlm(tmp_path, monkeypatch, capsys):
    make = record
    path = tmp_path / "mlm.toml"
    path.write_text(GRID)
    calls = []

    def fake_fit(cfg, run_dir, *, cache_dir, progress=None, record=None):
        calls.append(cfg)
        metrics = make("x", cfg.seed, 0.3 + cfg.mlm_probability / 10 + cfg.seed / 100)["metrics"]
        record(metrics)
        return metrics

    monkeypatch.setattr(mlm, "fit_mlm", fake_fit)
    args = ["--grid-file", str(path), "--work-dir", str(tmp_path / "w"), "--tables-dir", str(tmp_path / "t")]
    assert main(["reproduce", "mlm", *args, "--no-progress", "--set", "steps=7"]) == 0
    assert len(calls) == 4 and all(c.steps == 7 for c in calls)  # 2 rows x 2 seeds
    assert main(["reproduce", "mlm", *args, "--no-progress", "--set", "steps=7"]) == 0
    assert len(calls) == 4  # finished cells stay
    text = (tmp_path / "t" / "mlm@steps=7.md").read_text()  # overridden runs: the table's name says so
    assert not (tmp_path / "t" / "mlm.md").exists()
    assert "| 15% | 32.00 | 6.35 | 3.000 | 0.000 | +0.00 | 0.00 | 2 | 0.150 | 0.200 | 60 |" in text
    assert "| 40% | 34.50 | 6.35 | 3.000 | 0.000 | +2.50 | 0.00 | 2 |" in text  # paired: the seed spread cancels
    assert (tmp_path / "t" / "mlm@steps=7.tex").read_text().count("\\\\") == 3
    assert main(["table", "mlm", *args]) == 2  # without --set steps=7 these cells are not the selected ones
    assert "no results for grid 'mlm'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_on_shakespeare_improves_held_out_masked_accuracy(tmp_path):
    """Under a minute on 2 quiet cores: head warm-up, 20 steps at 30%, held-out scored before/after.

    Measured here: accuracy 8.4% -> 12.8% on 592 masked tokens, loss 6.66 -> 6.33.
    """
    cfg = MLMRunConfig(steps=20, batch_size=8, head_warmup_steps=20, eval_chunks=32, lr=5e-4, mlm_probability=0.3)
    metrics = mlm.fit_mlm(cfg, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert metrics["masked_tokens"] > 500
    assert metrics["heldout_loss_before"] < 7.0  # warmed head: far below uniform ln(30522) = 10.3
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"] - 0.15
    assert metrics["heldout_accuracy"] > metrics["heldout_accuracy_before"] + 0.02
    events = list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert events and json.dumps(metrics["mlm_probability_trajectory"]["rate"]) == json.dumps([0.3] * 20)


@pytest.mark.slow
def test_golden_losses_of_a_few_real_mlm_steps(tmp_path):
    """A refactor that changes MLM results (masks, batches, warm-up, loss) fails here."""
    from golden.make_mlm_golden import losses

    golden = json.loads((pathlib.Path(__file__).parent / "golden" / "mlm_losses.json").read_text())
    values = losses(tmp_path)
    torch.testing.assert_close(torch.tensor(values["train_loss"]), torch.tensor(golden["train_loss"]),
                               atol=3e-4, rtol=0)
    for name in ("heldout_loss_before", "heldout_loss"):
        assert values[name] == pytest.approx(golden[name], abs=3e-4), name
