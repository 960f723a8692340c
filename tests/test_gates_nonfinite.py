"""One rule for non-finite gate logits across every gate kind (issue 12, item 8): NaN in log_alpha is
refused by every method that reads it; +inf / -inf mean surely kept / surely removed."""

import pytest
import torch

from learnmask.gates import Gate, available_gates, make_gate

READERS = {
    "forward (train)": lambda g: g.train()(),
    "forward (eval)": lambda g: g.eval()(),
    "sample": lambda g: g.sample(),
    "deterministic_mask": lambda g: g.deterministic_mask(),
    "deterministic_mask(k)": lambda g: g.deterministic_mask(2),
    "expected_l0": lambda g: g.expected_l0(),
    "keep_probabilities": lambda g: g.keep_probabilities(),
    "keep_ratio": lambda g: g.keep_ratio(),
}


class _UserGate(Gate):
    """A kind written by a user, which does not check anything itself."""

    def sample(self, *, generator=None):
        return torch.sigmoid(self.log_alpha)

    def _eval_mask(self):
        return (self.log_alpha > 0).to(self.log_alpha.dtype)

    def expected_l0(self):
        return torch.sigmoid(self.log_alpha).sum()


def _gates():
    return {kind: make_gate(kind, (2, 3)) for kind in available_gates()} | {"user": _UserGate((2, 3))}


@pytest.mark.parametrize("kind", list(_gates()))
@pytest.mark.parametrize("reader", list(READERS))
def test_nan_log_alpha_is_refused_by_every_gate_kind(kind, reader):
    gate = _gates()[kind]
    with torch.no_grad():
        gate.log_alpha[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"log_alpha holds 1 NaN value\(s\) \(first at index \(1, 2\)\)"):
        READERS[reader](gate)


@pytest.mark.parametrize("kind", list(_gates()))
def test_infinite_log_alpha_means_surely_kept_or_removed(kind):
    gate = _gates()[kind]
    if kind == "fixed":  # its logits are its mask
        pytest.skip("a FixedGate's log_alpha is derived from its 0/1 mask")
    if kind == "topk":
        gate.k = 3  # top-k keeps a count: -inf is out, +inf in, whenever 0 < k < N
    with torch.no_grad():
        gate.log_alpha.fill_(0.5)
        gate.log_alpha[0, 0] = float("inf")
        gate.log_alpha[0, 1] = float("-inf")
    for reader, read in READERS.items():
        value = read(gate)
        assert torch.isfinite(value).all(), (reader, value)
        if reader in ("forward (train)", "forward (eval)", "sample", "deterministic_mask"):
            assert value[0, 0] == 1 and value[0, 1] == 0, (reader, value)
    assert 0 <= float(gate.keep_ratio().detach()) <= 1
