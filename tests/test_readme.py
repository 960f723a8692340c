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
    code = code.replace("LinearWarmup(0.9", "LinearWarmup(0.5").replace("eval_k = 7", "eval_k = 3")
    namespace = {"model": model, "batches": batches, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    assert not hasattr(model, "learnmask_gates") and not model._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"  # switched back by remove()
    assert int(handle.gates["heads"].deterministic_mask(3).sum()) == 3
    assert namespace["controller"].step_count == 2
    small = namespace["small"]  # the finalize() of the example removed the closed heads for real
    dense = sum(p.numel() for p in tiny_bert(num_labels=2, layers=2, heads=4).parameters())
    assert sum(p.numel() for p in small.parameters()) == handle.remaining_parameters() < dense


def _block(marker: str) -> str:
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    return next(code for code in re.findall(r"```python\n(.*?)```", text, re.S) if marker in code)


def test_readme_pruning_example_removes_what_the_gates_closed(tmp_path, monkeypatch):
    """The example's "train" comment is replaced by closing heads and FFN units, so finalize has
    something to remove: the pruned model is smaller, by exactly the handle's count, and equal to
    the gated model in eval."""
    monkeypatch.chdir(tmp_path)
    model = tiny_bert(num_labels=2, layers=2, heads=4)
    dense = sum(p.numel() for p in model.parameters())
    code = _block("lm.finalize(handle)").replace(
        "# ... train with loss + controller.penalty(handle.expected_parameter_sparsity()) as above ...",
        "with torch.no_grad():\n"
        "    handle.gates['heads'].log_alpha[0, :2] = -5.0\n"
        "    handle.gates['ffn'].log_alpha[1, :40] = -5.0")
    assert "log_alpha[0, :2]" in code
    namespace = {"model": model, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), namespace)
    small, handle = namespace["small"], namespace["handle"]  # small: as load_pruned read it back
    assert (tmp_path / "pruned" / "model.safetensors").is_file() and (tmp_path / "pruned" / "pruning.json").is_file()
    assert sum(p.numel() for p in small.parameters()) == handle.remaining_parameters() < dense
    assert small.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert small.bert.encoder.layer[1].intermediate.dense.out_features == 64 - 40
    ids = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, handle.finalize()(input_ids=ids).logits)
        assert (small(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_readme_attention_example_runs_and_matches_the_reference():
    namespace = {}
    exec(compile(_block("masked_attention("), "README.md", "exec"), namespace)
    from learnmask.ops import masked_attention

    assert "lm.masked_attention(" in _block("masked_attention(")
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
    code = _block("ffn_up_modules=").replace("small = lm.finalize(handle)", "")
    exec(compile(code, "README.md", "exec"), namespace)
    handle = namespace["handle"]
    with torch.no_grad():
        handle.gates["heads"].log_alpha.copy_(torch.tensor([[5.0, -5, 5, -5], [-5, 5, 5, 5]]))
        handle.gates["ffn"].log_alpha.copy_(torch.linspace(-4, 4, 32).repeat(2, 1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        gated = model(x)
        small = namespace["lm"].finalize(handle)
        assert (small(x) - gated).abs().max().item() <= 1e-5
    assert [b.attn.num_heads for b in small.blocks] == [2, 3] and small.blocks[0].attn.q.out_features == 8
    assert small.blocks[0].mlp.fc1.out_features == 25  # log_alpha <= -2.398 closes a unit: 7 of 32


def test_readme_token_gate_example_trains_the_scorers_and_finalizes_to_the_same_outputs():
    """The token example on a tiny BERT with padded batches: the controller acted, the scorers
    moved, and the finalized model (no learnmask hook) gives the gated model's eval logits while
    its later layer sees half the real tokens."""
    torch.manual_seed(0)
    model = tiny_bert(num_labels=2, layers=3, heads=4)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    batches = [{"input_ids": torch.randint(5, 100, (4, 10)), "attention_mask": mask,
                "labels": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    code = _block("tokens=True")
    namespace = {"model": model, "batches": batches, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), namespace)
    handle, fast, controller = namespace["handle"], namespace["fast"], namespace["controller"]
    assert controller.step_count == 3
    scorer = handle.tokens.scorers[0]
    assert not torch.equal(scorer.norm.weight, torch.ones_like(scorer.norm.weight))  # starts at 1: it trained
    seen = []
    layer = model.bert.encoder.layer[2]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        gated = model(input_ids=batches[0]["input_ids"], attention_mask=mask).logits
    hook.remove()
    assert seen == [5]  # round(0.5 * 10) tokens for the longest example, gathered
    with torch.no_grad():
        exported = fast(input_ids=batches[0]["input_ids"], attention_mask=mask).logits
    assert (exported - gated).abs().max().item() <= 1e-5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in fast.modules())
