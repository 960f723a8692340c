"""Run under ``torchrun --nproc-per-node 2`` by tests/test_distributed.py (not a test module): a
tiny BERT with token gates after layer 0, where rank 0's examples hold CLS alone (every other
position is padding, which is never kept: no token of that batch is open after the pruning
layer), in two cases: every head gate hard-zero (a FixedGate of zeros), or every head open. One
DDP step with ``find_unused_parameters=False`` each; each rank saves the gradients DDP gave it
and the gradients of its own batch alone (``OUT/<case><rank>.pt``). Then, in ``OUT/rest<rank>.pt``:
the empirical Fisher of the rank's own batch (averaged over ranks, and alone), Child-Tuning-F's
masks of one step, and a Lagrangian and a loss-adaptive controller fed a different value on each rank.

    torchrun --nproc-per-node 2 tests/ddp_grads_worker.py OUT
"""
import copy
import pathlib
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import tiny_bert  # noqa: E402

import learnmask as lm  # noqa: E402
from learnmask import distributed  # noqa: E402
from learnmask.gates import FixedGate  # noqa: E402
from learnmask.sampling import step_sampling  # noqa: E402


def build(heads_open: bool):
    torch.manual_seed(0)
    model = tiny_bert(num_labels=2, layers=2, heads=4).train()
    handle = lm.apply_masks(model, heads=True, tokens=True, token_layers=[0], token_keep_ratio=0.5,
                            gates={"heads": FixedGate(torch.full((2, 4), float(heads_open)))})
    return model, handle


def batch_of(rank):
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(5, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if rank == 0:
        mask[:, 1:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, rank])}


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def rest(rank: int) -> dict:
    from unittest import mock

    from learnmask.params import ChildTuningF, empirical_fisher

    model = tiny_bert(num_labels=2, layers=1, heads=2)
    chosen = ["classifier.weight", "bert.encoder.layer.0.output.dense.weight"]

    def fisher():
        return empirical_fisher(model, [batch_of(rank)], lambda m, b: m(**b).loss, parameters=chosen)

    averaged = fisher()
    with mock.patch.object(distributed, "active", lambda: False):
        alone = fisher()
    params = dict(model.named_parameters())
    with step_sampling("run", 5, rank):
        masks, _ = ChildTuningF({name: params[name] for name in chosen}, p=0.3).sample()
    lagrangian = lm.LagrangianController(0.5, lr=0.5)
    # a token keep ratio measured on other examples on each rank
    lagrangian.penalty(torch.tensor(0.2 + 0.4 * rank, dtype=torch.float64))
    lagrangian.step()
    adaptive = lm.LossAdaptiveController(0.15, r_min=0.1, r_max=0.4, max_step=0.01)
    for loss in (2.0, 1.0 + rank, 3.0 - rank):
        adaptive.update(loss)
    return {"fisher": averaged, "fisher_alone": alone, "child_tuning": masks, "lagrangian": lagrangian.state_dict(),
            "adaptive": adaptive.state_dict()}


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    torch.set_num_threads(1)
    distributed.init_from_environment("gloo")
    rank = distributed.rank()
    for case in ("heads_closed", "heads_open"):
        model, handle = build(case == "heads_open")
        local_model = copy.deepcopy(model)
        with step_sampling("grads", 0, rank):
            local_model(**batch_of(rank)).loss.backward()
        local = grads(local_model)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        with step_sampling("grads", 0, rank):
            loss = ddp(**batch_of(rank)).loss
            kept = [mask.clone() for mask in handle.token_masks()]
            loss.backward()
        torch.save({"ddp": grads(model), "local": local, "kept": kept}, out / f"{case}{rank}.pt")
    torch.save(rest(rank), out / f"rest{rank}.pt")
    distributed.end()


if __name__ == "__main__":
    main()
