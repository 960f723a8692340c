"""The README's Python example runs as written (on a tiny model and two batches)."""
import pathlib
import re

import torch

from conftest import tiny_bert


def test_readme_python_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    model = tiny_bert(num_labels=2, layers=2, heads=4)
    batches = [{"input_ids": torch.randint(5, 100, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]
    code = code.replace("LinearWarmup(0.9", "LinearWarmup(0.5").replace("eval_k = 7", "eval_k = 3").replace("mask(7)", "mask(3)")
    namespace = {"model": model, "batches": batches, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    assert not hasattr(model, "learnmask_head_gate") and not model._forward_pre_hooks
    assert int(handle.gate.deterministic_mask(3).sum()) == 3
    assert namespace["controller"].step_count == 2
