"""``import learnmask as lm``: cheap (no torch until a name is used), every advertised name
resolves to the object of its home module, and unknown names are a clear AttributeError."""
import importlib
import subprocess
import sys

import pytest

import learnmask as lm


def test_importing_learnmask_loads_no_torch_and_no_submodule():
    code = ("import sys, learnmask; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('learnmask.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(lm._HOME))
def test_every_front_door_name_is_its_home_modules_object(name):
    home = importlib.import_module(lm._HOME[name])
    assert getattr(lm, name) is getattr(home, name)
    assert name in dir(lm) and name in lm.__all__


def test_the_advertised_groups_are_there():
    for name in ("apply_masks", "MaskConfig", "finalize", "HardConcreteGate", "TopKGate", "LagrangianController",
                 "PIController", "LinearWarmup", "masked_attention", "causal", "sliding_window", "padding",
                 "GateCallback"):
        assert name in lm._HOME


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'learnmask' has no attribute 'apply_mask'"):
        lm.apply_mask
