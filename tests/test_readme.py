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


def _block(marker: str) -> str:
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    return next(code for code in re.findall(r"```python\n(.*?)```", text, re.S) if marker in code)


def test_readme_pruning_example_runs_and_the_saved_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_bert(num_labels=2, layers=2, heads=4)
    namespace = {"model": model, "print": lambda *a: None}
    exec(compile(_block("finalize(handle)"), "README.md", "exec"), namespace)
    assert (tmp_path / "pruned" / "model.safetensors").is_file() and (tmp_path / "pruned" / "pruning.json").is_file()
    from learnmask.export import finalize

    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        expected = finalize(namespace["handle"])(input_ids=ids).logits
        assert torch.equal(namespace["small"](input_ids=ids).logits, expected)
        assert torch.allclose(expected, model(input_ids=ids).logits, atol=1e-5)


def test_readme_attention_example_runs_and_matches_the_reference():
    namespace = {}
    exec(compile(_block("masked_attention("), "README.md", "exec"), namespace)
    from learnmask.ops import masked_attention

    q, k, v, mask, gate = (namespace[name] for name in ("q", "k", "v", "mask", "token_gate"))
    golden = masked_attention(q, k, v, mask=mask, token_gate=gate, backend="reference")
    assert torch.allclose(namespace["out"], golden, atol=1e-5)
    assert torch.isfinite(gate.grad).all() and gate.grad.abs().sum() > 0
    assert torch.equal(namespace["out"][1, :, :, :].isfinite(), torch.ones_like(namespace["out"][1], dtype=torch.bool))


def test_readme_custom_model_example_prunes_heads_and_units():
    from einops import rearrange
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.proj = (nn.Linear(16, 16) for _ in range(4))
            self.num_heads = 4

        def forward(self, x):
            q, k, v = (rearrange(f(x), "b s (h e) -> b h s e", h=self.num_heads) for f in (self.q, self.k, self.v))
            return self.proj(rearrange(nn.functional.scaled_dot_product_attention(q, k, v), "b h s e -> b s (h e)"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()
            self.mlp = nn.Sequential()
            self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Model().eval()
    namespace = {"model": model}
    code = _block("ffn_up_modules=").replace("small = finalize(handle)", "")
    exec(compile(code, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    with torch.no_grad():
        handle.gates["heads"].log_alpha.copy_(torch.tensor([[5.0, -5, 5, -5], [-5, 5, 5, 5]]))
        handle.gates["ffn"].log_alpha.copy_(torch.linspace(-4, 4, 32).repeat(2, 1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        gated = model(x)
        small = namespace["finalize"](handle)
        assert (small(x) - gated).abs().max().item() <= 1e-5
    assert [b.attn.num_heads for b in small.blocks] == [2, 3] and small.blocks[0].attn.q.out_features == 8
    assert small.blocks[0].mlp.fc1.out_features == 25  # log_alpha <= -2.398 closes a unit: 7 of 32
