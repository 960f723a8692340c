"""Run under ``torchrun --nproc-per-node 2`` by tests/test_distributed.py (not a test module): one
cell of the token-pruning recipe (``fit_tokens``) on the tiny synthetic text task of
tests/test_token_recipe.py, trained by two gloo ranks. Each rank saves its final model state, the
controller's state and the metrics it returned (``OUT/tokens<rank>.pt``).

    torchrun --nproc-per-node 2 tests/ddp_tokens_worker.py OUT METHOD
"""
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_token_recipe import TINY, text_examples  # noqa: E402

from learnmask import distributed  # noqa: E402
from learnmask.recipe import tokens as recipe  # noqa: E402
from learnmask.recipe.token_config import TokenRunConfig  # noqa: E402
from learnmask.recipe.token_tasks import TaskData  # noqa: E402
from tests.conftest import tiny_bert  # noqa: E402


def load(cfg):
    torch.manual_seed(cfg.seed)
    model = tiny_bert(num_labels=2, layers=3, heads=4)
    return TaskData(model, text_examples(48, 0), text_examples(80, 1), ["no", "yes"])


def main() -> None:
    out, method = pathlib.Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    distributed.init_from_environment("gloo")
    recipe.load_task = load
    recipe.measure.MIN_PASS_SECONDS = 0.0
    seen = {}
    task_class = recipe.TokenTask

    class Recorded(task_class):  # keeps the pruning-phase task (its model and controllers) for the checks
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["task"] = self

    recipe.TokenTask = Recorded
    cfg = TokenRunConfig.from_dict({**TINY, "token_layers": [0, 1], "task": "bbcnews-minilm", "method": method,
                                    "keep_ratio": 0.5})
    metrics = recipe.fit_tokens(cfg, out / "run", cache_dir=out / "cache")
    task = seen["task"]
    controllers = {name: getattr(task, name).state_dict() for name in ("controller", "adaptive")
                   if getattr(task, name, None) is not None}
    torch.save({"model": {k: v.clone() for k, v in task.model.state_dict().items()}, "controllers": controllers,
                "metrics": metrics, "losses": None}, out / f"tokens{distributed.rank()}.pt")
    distributed.end()


if __name__ == "__main__":
    main()
