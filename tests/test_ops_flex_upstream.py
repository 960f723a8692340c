"""Upstream fault pinned (issue 12, item 9): torch's compiled FlexAttention on CPU returns wrong rows,
at random (NaN at times), when the key length K % 16 == 8 — at every thread count, observed with head
dims 8 and 16 (learnmask.ops.flex.faulty_cpu_kv_length says what was measured). The flex backend
refuses that configuration with the reason; the strict xfail below runs plain compiled FlexAttention
there and turns red once torch returns the right rows, which is when the refusal can be lifted."""

import pytest
import torch
import torch.nn.functional as F

from learnmask.masks import attention as am
from learnmask.ops import flex as flex_module
from learnmask.ops.attention import BackendNotSupported, backend_reasons, choose_backend, masked_attention

SHAPES = [(2, 4, 8, 8, 16), (1, 1, 8, 8, 16), (2, 4, 8, 8, 8), (2, 1, 16, 40, 16)]  # (B, H, Q, K, D)


def _flex_compiles_here() -> bool:
    return flex_module._flex_module() is not None and not flex_module._compile_reasons("cpu")


@pytest.mark.skipif(not _flex_compiles_here(), reason="compiled FlexAttention is not available on this CPU")
@pytest.mark.xfail(strict=True, reason="torch's compiled FlexAttention on CPU returns wrong rows at K % 16 == 8; when "
                                       "this passes, lift learnmask.ops.flex.faulty_cpu_kv_length")
def test_plain_compiled_flex_attention_on_cpu_is_right_at_kv_lengths_8_mod_16():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for b, h, q_len, kv_len, d in SHAPES:
                gen = torch.Generator().manual_seed(q_len * 100 + d)
                q = torch.randn(b, h, q_len, d, generator=gen)
                k, v = (torch.randn(b, h, kv_len, d, generator=gen) for _ in range(2))
                expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
                for _ in range(3):  # the fault is intermittent
                    with torch.no_grad():
                        torch.testing.assert_close(compiled(q, k, v), expected, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_len", [8, 40, 264])
def test_the_flex_backend_refuses_kv_lengths_8_mod_16_on_cpu_and_auto_goes_elsewhere(kv_len):
    q, kv = torch.randn(2, 4, 8, 16), torch.randn(2, 4, kv_len, 16)
    with torch.no_grad():
        reasons = backend_reasons(q, kv, kv, mask=am.causal())["flex"]
        assert any("K % 16 == 8" in r for r in reasons)
        with pytest.raises(BackendNotSupported, match=f"K = {kv_len}"):
            masked_attention(q, kv, kv, mask=am.causal(), backend="flex")
        assert "flex" not in choose_backend(q, kv, kv, mask=am.sliding_window(3)).ranking
        for fine in (9, 16, 32):
            other = torch.randn(2, 4, fine, 16)
            assert not any("K % 16" in r for r in backend_reasons(q, other, other, mask=am.causal())["flex"])
    eager = flex_module.FlexBackend(compile=False)  # eager FlexAttention is right there: not refused
    with torch.no_grad():
        torch.testing.assert_close(masked_attention(q, kv, kv, mask=am.causal(), backend=eager),
                                   masked_attention(q, kv, kv, mask=am.causal(), backend="reference"))
