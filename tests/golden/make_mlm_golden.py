"""Regenerate mlm_losses.json: `python tests/golden/make_mlm_golden.py`.

Only after a change that is *meant* to alter MLM training results; say so in the commit.
"""
import json
import pathlib
import tempfile

from learnmask.recipe.mlm import fit_mlm
from learnmask.recipe.mlm_config import MLMRunConfig

CONFIG = MLMRunConfig(steps=3, batch_size=4, head_warmup_steps=2, eval_chunks=8, schedule="linear",
                      mlm_probability=0.3, final_mlm_probability=0.15)


def losses(folder: pathlib.Path) -> dict:
    metrics = fit_mlm(CONFIG, folder / "run", cache_dir=folder / "cache")
    return {"train_loss": metrics["mlm_probability_trajectory"]["loss"],
            "heldout_loss_before": metrics["heldout_loss_before"], "heldout_loss": metrics["heldout_loss"]}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        values = losses(pathlib.Path(tmp))
    out = pathlib.Path(__file__).with_name("mlm_losses.json")
    out.write_text(json.dumps(values) + "\n")
    print(out, values)
