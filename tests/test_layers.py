"""The dependency direction of DESIGN.md (top uses bottom, never the reverse), checked in a fresh
interpreter per layer: importing a lower layer (and using its main entry) loads no module of a layer
above it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> (code run after importing it, layers it must not load)
LAYERS = {
    "learnmask.masks": ("from learnmask.masks import attention as am; m = am.causal() & am.sliding_window(2); "
                        "m.structure(); m.keep(1, 1, 4, 4)", ["ops", "inject", "recipe", "export"]),
    "learnmask.masks.structure_blocks": ("", ["ops", "inject", "recipe", "export"]),
    "learnmask.ops": ("import torch; from learnmask.ops import masked_attention; q = torch.randn(1, 1, 4, 8); "
                      "masked_attention(q, q, q)", ["inject", "recipe", "export"]),
    "learnmask.gates": ("from learnmask.gates import make_gate; make_gate('hard_concrete', (2, 3))()",
                        ["ops", "inject", "recipe", "export"]),
    "learnmask.control": ("", ["ops", "inject", "recipe", "export"]),
    "learnmask.functional": ("", ["ops", "inject", "recipe", "export"]),
}


def _loaded_after(module: str, code: str) -> list[str]:
    script = (f"import sys, json\nimport {module}\n{code}\n"
              "print(json.dumps(sorted(n for n in sys.modules if n.startswith('learnmask.'))))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", list(LAYERS))
def test_a_layer_loads_nothing_above_it(module):
    code, forbidden = LAYERS[module]
    loaded = _loaded_after(module, code)
    above = [name for name in loaded if name.split(".")[1] in forbidden]
    assert not above, f"importing {module} loaded {above}; it must not depend on {forbidden}"
    assert module in loaded
