"""Run under ``torchrun`` by tests/test_distributed.py (not a test module): one classification run
of the shared loop on a tiny BERT and a toy task, each rank saving what it ends with.

    torchrun --nproc-per-node N tests/ddp_worker.py OUT CONFIG_JSON [accumulation_steps]

writes ``OUT/rank<r>.pt``: the model's state_dict (gates included), the controller's state, the
loop's task losses, and the world size. With ``STOP_AT=N`` in the environment every rank exits
(status 3) right after the checkpoint of step N is written, as a killed run would; with
``NAN_AT=step,rank`` that rank's loss is NaN at that step (the others' finite).
"""
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import synthetic, tiny_bert  # noqa: E402

from learnmask import distributed  # noqa: E402
from learnmask.recipe import train as recipe  # noqa: E402
from learnmask.recipe.config import RunConfig  # noqa: E402


def load(cfg):
    torch.manual_seed(cfg.seed)
    return tiny_bert(num_labels=2, layers=2, heads=4), synthetic(int(cfg.max_train_examples or 96), 0), \
        synthetic(32, 1), 0


def main() -> None:
    out, options = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
    accumulation = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(1)
    distributed.init_from_environment(options.pop("backend", None))
    recipe._load = load
    cfg = RunConfig.from_dict(options, where="ddp_worker")
    prepared = recipe.prepare(cfg, out / "cache")
    trainer = recipe.Trainer(cfg, prepared, out / "run")
    if accumulation > 1:
        trainer.loop.accumulation_steps = accumulation
    if os.environ.get("NAN_AT"):
        nan_step, nan_rank = (int(x) for x in os.environ["NAN_AT"].split(","))
        loss = trainer.task.loss

        def maybe_nan(batch, step):
            objective, task_loss = loss(batch, step)
            if (step, distributed.rank()) == (nan_step, nan_rank):
                return objective * float("nan"), task_loss
            return objective, task_loss

        trainer.task.loss = maybe_nan
    stop_at = int(os.environ.get("STOP_AT", "0"))
    if stop_at:
        save = trainer.loop.save

        def save_then_stop():
            save()
            if trainer.loop.step == stop_at:
                os._exit(3)

        trainer.loop.save = save_then_stop
    trainer.run()
    state = {
        "world": distributed.world_size(),
        "model": {k: v.clone() for k, v in prepared.model.state_dict().items()},
        "controller": trainer.controller.state_dict() if trainer.controller is not None else None,
        "losses": list(trainer.loop.losses),
        "skipped": trainer.loop.skipped,
    }
    torch.save(state, out / f"rank{distributed.rank()}.pt")
    distributed.end()


if __name__ == "__main__":
    main()
