"""Regenerate hard_concrete_losses.json: `python tests/golden/make_golden.py`.

Only after a change that is *meant* to alter training results; say so in the commit.
"""
import json
import pathlib
import tempfile

from learnmask.recipe import train as recipe
from learnmask.recipe.config import RunConfig

CONFIG = RunConfig(method="hard_concrete", target_sparsity=0.5, max_train_examples=128, epochs=1, test_size=100)

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        prepared = recipe.prepare(CONFIG, pathlib.Path(tmp))
        trainer = recipe.Trainer(CONFIG, prepared, pathlib.Path(tmp) / "run")
        trainer.run()
    out = pathlib.Path(__file__).with_name("hard_concrete_losses.json")
    out.write_text(json.dumps([round(x, 6) for x in trainer.loss_history]) + "\n")
    print(out, trainer.loss_history)
