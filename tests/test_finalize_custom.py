"""finalize() of a model learnmask does not know, gated through target_modules/ffn_modules:
with the q/k/v and FFN up projections named, closed heads and units are removed and the
pruned model equals the gated one; without them, or with names that do not fit, clear errors."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from learnmask.export import finalize
from learnmask.gates import FixedGate
from learnmask.inject import apply_masks

D_MODEL, HEADS, UNITS = 24, 4, 40


class SplitAttention(nn.Module):
    """Separate q/k/v projections; reads its head count from ``self.num_heads``."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D_MODEL, D_MODEL) for _ in range(3))
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.num_heads = HEADS

    def forward(self, x):
        q, k, v = (rearrange(f(x), "b s (h e) -> b h s e", h=self.num_heads) for f in (self.q, self.k, self.v))
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h s e -> b s (h e)"))


class FusedAttention(nn.Module):
    """One [q; k; v] projection (timm style); the head count comes from shapes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.head_dim = D_MODEL // HEADS

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, e=self.head_dim)
        return self.out(rearrange(F.scaled_dot_product_attention(q, k, v, is_causal=True), "b h s e -> b s (h e)"))


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D_MODEL, UNITS), nn.Linear(D_MODEL, UNITS), nn.Linear(UNITS, D_MODEL)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, attention, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn, self.mlp = attention, mlp
        self.probe = nn.Linear(D_MODEL, D_MODEL)  # unused: a linear map of the wrong width for error tests

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _model(seed=0):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(D_MODEL, UNITS), nn.GELU(), nn.Linear(UNITS, D_MODEL))
    return nn.Sequential(Block(SplitAttention(), GatedMLP()), Block(FusedAttention(), mlp)).eval()


NAMES = dict(target_modules=["0.attn.proj", "1.attn.out"], num_heads=HEADS,
             qkv_modules=[["0.attn.q", "0.attn.k", "0.attn.v"], "1.attn.qkv"], head_count_attribute="num_heads",
             ffn_modules=["0.mlp.down", "1.mlp.2"], ffn_up_modules=[["0.mlp.gate", "0.mlp.up"], "1.mlp.0"])
X = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(1))


def _run(model):
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_custom_model_finalize_equals_gated_and_removes_units(seed):
    model = _model()
    handle = apply_masks(model, heads=True, ffn=True, attention_blocks=True, ffn_blocks=True, **NAMES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
        handle.gates["attention_blocks"].log_alpha.fill_(10.0)
        handle.gates["heads"].log_alpha[:, 0] = 10.0  # every layer keeps a head: counts are exact
        handle.gates["ffn_blocks"].log_alpha[1] = -10.0  # a closed FFN block: zero-width maps
    masks = handle.eval_masks()
    gated = _run(model)
    plain = finalize(handle)
    assert (_run(plain) - gated).abs().max().item() <= 1e-5
    assert torch.equal(_run(model), gated)  # the gated model is untouched
    kept = (masks["heads"] > 0).sum(dim=1).tolist()
    assert plain[0].attn.num_heads == kept[0] and plain[0].attn.q.out_features == kept[0] * 6
    assert plain[1].attn.qkv.out_features == 3 * kept[1] * 6
    assert plain[0].mlp.up.out_features == plain[0].mlp.gate.out_features == int((masks["ffn"][0] > 0).sum())
    assert plain[1].mlp[0].out_features == 0 and plain[1].mlp[2].bias is None
    assert sum(p.numel() for p in plain.parameters()) == handle.remaining_parameters()


def test_a_layer_with_every_head_closed_keeps_one_zeroed_head():
    model = _model()
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    handle = apply_masks(model, heads=True, gates={"heads": FixedGate(mask)},
                         **{k: v for k, v in NAMES.items() if not k.startswith("ffn")})
    gated = _run(model)
    plain = finalize(handle)
    assert (_run(plain) - gated).abs().max().item() <= 1e-5
    assert plain[0].attn.num_heads == 1 and plain[1].attn.qkv.out_features == 3 * 2 * 6
    one_head = 3 * (6 * D_MODEL + 6) + 6 * D_MODEL  # q, k, v rows and out columns of the zeroed head
    count = sum(p.numel() for p in plain.parameters())
    assert count == handle.remaining_parameters() == handle.parameters_for(handle.eval_masks()) + one_head


def test_finalize_without_the_projections_names_what_to_pass():
    model = _model()
    handle = apply_masks(model, target_modules=NAMES["target_modules"], num_heads=HEADS, ffn=True,
                         ffn_modules=NAMES["ffn_modules"])
    with pytest.raises(ValueError, match=r"apply_masks with qkv_modules \(for target_modules\) and "
                                         r"ffn_up_modules \(for ffn_modules\)"):
        finalize(handle)


BAD = [
    (dict(NAMES, qkv_modules=[["0.attn.q", "0.attn.k", "0.attn.v"]]),
     r"qkv_modules has 1 entries; expected one per name in target_modules \(2\)"),
    (dict(NAMES, qkv_modules=[["0.attn.q", "0.attn.k"], "1.attn.qkv"]), r"must be 1 or 3 module name\(s\)"),
    (dict(NAMES, qkv_modules=[["0.attn.q", "0.attn.k", "0.attn.v"], "1.probe"]),
     r"qkv_modules \['1.probe'\] have \[24\] output features; expected \[72\]"),
    (dict(NAMES, qkv_modules=[["0.attn.q", "0.attn.k", "0.norm1"], "1.attn.qkv"]),
     r"'0.norm1' is a LayerNorm, not a linear map"),
    (dict(NAMES, head_count_attribute=None), r"SplitAttention '0.attn' has num_heads = 4, which finalize would "
                                             r"leave stale; pass head_count_attribute='num_heads'"),
    (dict(NAMES, head_count_attribute=3), r"head_count_attribute must be an attribute name given with qkv_modules"),
    (dict(NAMES, ffn_up_modules=["0.mlp.gate", "1.probe"]),
     r"ffn_up_modules '1.probe' has 24 output features; expected the 40 inputs of '1.mlp.2'"),
    (dict(NAMES, ffn_up_modules=["0.mlp.nope", "1.mlp.0"]), r"target module '0.mlp.nope' not found"),
    (dict(target_modules=None, qkv_modules=["a"]),
     r"qkv_modules has 1 entries; expected one per name in target_modules"),
    (dict(NAMES, qkv_modules="0.attn.qkv"), r"qkv_modules must be a list with one entry per layer"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_projection_names_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        apply_masks(_model(), ffn=True, **options)


MORE_BAD = [
    (dict(NAMES, num_heads=2), r"SplitAttention '0.attn' has num_heads = 4, but num_heads=2"),
    (dict(NAMES, num_heads=8, head_count_attribute=None), r"has num_heads = 4, but num_heads=8"),
    (dict(NAMES, head_count_attribute="n_heads"),
     r"head_count_attribute 'n_heads': no attention module .* has an int attribute of that name"),
    (dict(NAMES, num_heads=0), r"num_heads must be a positive int \(heads per block\); got 0"),
    (dict(NAMES, num_heads="4"), r"num_heads must be a positive int \(heads per block\); got '4'"),
    (dict(NAMES, qkv_modules=[["0.attn.q", "0.attn.k", "0.attn.proj"], "1.attn.qkv"]),
     r"module name\(s\) \['0.attn.proj'\] given more than once"),
    (dict(NAMES, target_modules=["0.attn.proj", "0.attn.proj"]), r"\['0.attn.proj'\] given more than once"),
]


@pytest.mark.parametrize("options, message", MORE_BAD)
def test_head_counts_and_repeated_names_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        apply_masks(_model(), ffn=True, **options)


def test_a_bool_attribute_is_not_a_head_count():
    model = _model()
    model[0].attn.fused = True  # a flag, not a count: never overwritten as one
    handle = apply_masks(model, **dict(NAMES, head_count_attribute="num_heads"))
    with torch.no_grad():
        handle.gates["heads"].log_alpha.copy_(torch.tensor([[5.0, -5, 5, 5], [5, 5, -5, 5]]))
    assert finalize(handle)[0].attn.fused is True
    with pytest.raises(ValueError, match="no attention module .* has an int attribute"):
        apply_masks(_model(), **dict(NAMES, head_count_attribute="training"))


def test_a_closed_attention_block_keeps_one_zeroed_head_and_its_zeroed_bias():
    model = _model()
    gates = {"heads": FixedGate(torch.ones(2, HEADS)), "attention_blocks": FixedGate(torch.tensor([0.0, 1.0]))}
    handle = apply_masks(model, heads=True, attention_blocks=True, gates=gates,
                         **{k: v for k, v in NAMES.items() if not k.startswith("ffn")})
    gated = _run(model)
    plain = finalize(handle)
    assert (_run(plain) - gated).abs().max().item() <= 1e-5
    assert plain[0].attn.num_heads == 1 and torch.equal(plain[0].attn.proj.bias, torch.zeros(D_MODEL))
    assert sum(p.numel() for p in plain.parameters()) == handle.remaining_parameters()
