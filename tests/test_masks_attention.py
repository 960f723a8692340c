"""Attention masks: conventions, algebra (hypothesis), structures, block classification, biases (A2),
polarity (A3), and refusals of masks built for other sizes or devices."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learnmask.masks import attention as am
from learnmask.masks.structure import MaskStructure, conjoin
from learnmask.masks.structure_blocks import block_states, row_intervals
from learnmask.ops.row_plan import plan_groups

B, H, Q, K = 2, 3, 11, 13


# -- conventions --------------------------------------------------------------------------------

def test_sliding_window_counts_the_query_itself():
    keep = am.sliding_window(3).keep(1, 1, 6, 6)[0, 0]
    assert keep.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert keep[5].tolist() == [False, False, False, True, True, True]
    assert am.sliding_window(1).keep(1, 1, 4, 4)[0, 0].equal(torch.eye(4, dtype=torch.bool))


def test_causal_is_top_left_aligned_for_q_ne_k():
    keep = am.causal().keep(1, 1, 3, 5)[0, 0]
    assert keep.equal(torch.ones(3, 5, dtype=torch.bool).tril())


def test_padding_polarities_agree():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    key_padding_mask = attention_mask == 0  # nn.MultiheadAttention: True = ignore
    a = am.padding(attention_mask).keep(2, 1, 3, 4)
    b = am.from_key_padding_mask(key_padding_mask).keep(2, 1, 3, 4)
    assert a.equal(b)
    assert a[1, 0, 0].tolist() == [True, True, False, False]


def test_prefix_lm_and_chunked():
    keep = am.prefix_lm(torch.tensor([2, 0])).keep(2, 1, 4, 4)
    assert keep[0, 0, 0].tolist() == [True, True, False, False]
    assert keep[1, 0].equal(torch.ones(4, 4, dtype=torch.bool).tril())
    chunk = am.chunked(2).keep(1, 1, 4, 4)[0, 0]
    assert chunk[1].tolist() == [True, True, False, False] and chunk[2].tolist() == [False, False, True, True]


def test_document_with_separate_kv_ids():
    keep = am.document(torch.tensor([[0, 1]]), torch.tensor([[0, 0, 1]])).keep(1, 1, 2, 3)[0, 0]
    assert keep.tolist() == [[True, True, False], [False, False, True]]


def test_keep_broadcasts_only_over_what_it_depends_on():
    assert am.causal().keep(B, H, Q, K).shape == (1, 1, Q, K)
    pad = am.padding(torch.ones(B, K, dtype=torch.bool))
    assert (am.causal() & pad).keep(B, H, Q, K).shape == (B, 1, Q, K)
    user = am.from_mod(lambda b, h, q, k: (q + h) >= k)
    assert user.keep(B, H, Q, K).shape == (B, H, Q, K)


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocks", "auto"])
def test_a_mask_copies_its_tensors_so_every_backend_sees_it_as_built(backend):
    from learnmask.ops import masked_attention

    keep = torch.ones(2, 16, dtype=torch.bool)
    ids = torch.zeros(2, 16, dtype=torch.long)
    mask = am.padding(keep) & am.causal() & am.document(ids)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    before = masked_attention(q, k, v, mask=mask, backend=backend)
    keep[:, 8:] = False  # the caller reuses its tensors in place
    ids[:, 4:] = 1
    assert torch.equal(masked_attention(q, k, v, mask=mask, backend=backend), before)
    assert torch.allclose(before, masked_attention(q, k, v, mask=am.causal(), backend="reference"), atol=1e-6)


def test_mask_built_for_other_sizes_is_refused():
    pad = am.padding(torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 8\).*\(2, 10\)"):
        pad.keep(2, 1, 10, 10)
    with pytest.raises(ValueError, match="attention_mask"):
        pad.block_mask(3, 1, 8, 8)
    docs = am.document(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_document_ids"):
        docs.keep(2, 1, 5, 6)
    with pytest.raises(ValueError, match="prefix_lengths"):
        am.prefix_lm(torch.tensor([1, 2, 3])).keep(2, 1, 4, 4)


def test_mask_on_another_device_is_refused():
    pad = am.padding(torch.ones(2, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="meta.*cpu"):
        (am.causal() & pad).keep(2, 1, 4, 4, device="cpu")


def test_bad_constructor_arguments():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            am.sliding_window(bad)
        with pytest.raises(ValueError):
            am.chunked(bad)
    with pytest.raises(ValueError, match="0/1"):
        am.padding(torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="2-d"):
        am.padding(torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        am.prefix_lm(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        am.document(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        am.causal() & (lambda b, h, q, k: q >= k)
    with pytest.raises(TypeError, match="bool"):
        am.from_mod(lambda b, h, q, k: (q - k).float()).keep(1, 1, 2, 2)


def test_block_mask_is_cached_per_sizes():
    mask = am.causal() & am.sliding_window(4)
    first = mask.block_mask(1, 1, 40, 40, block_size=16)
    assert mask.block_mask(1, 1, 40, 40, block_size=16) is first
    other = mask.block_mask(1, 1, 48, 48, block_size=16)
    assert other is not first and other.shape[-2:] == (48, 48)


# -- additive biases (A2) -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a2_combined_bias_is_exactly_finfo_min(dtype):
    pad = am.padding(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    bias = (am.causal() & pad).bias(2, 1, 5, 5, dtype=dtype)
    keep = (am.causal() & pad).keep(2, 1, 5, 5)
    minimum = torch.finfo(dtype).min
    assert bias.dtype == dtype
    assert torch.isfinite(bias).all()
    assert (bias[~keep.expand_as(bias)] == minimum).all() and (bias[keep.expand_as(bias)] == 0).all()
    summed = am.add_biases(am.causal().bias(2, 1, 5, 5, dtype=dtype), pad.bias(2, 1, 5, 5, dtype=dtype))
    assert torch.isfinite(summed).all() and summed.equal(bias.expand_as(summed))


def test_a2_fp16_masked_scores_softmax():
    scores = torch.zeros(2, 2, dtype=torch.float16)
    keep = torch.tensor([[True, False], [True, True]])
    masked = scores + am.keep_to_bias(keep, torch.float16)
    probs = torch.softmax(masked, dim=-1)
    assert probs.tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_bias_to_keep_accepts_inf_and_any_finfo_min_and_refuses_score_biases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        bias = torch.tensor([0.0, float("-inf"), torch.finfo(dtype).min], dtype=dtype)
        assert am.bias_to_keep(bias).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="score biases"):
        am.bias_to_keep(torch.tensor([0.0, -0.5]))
    with pytest.raises(ValueError):
        am.bias_to_keep(torch.tensor([float("nan")]))


# -- structures -------------------------------------------------------------------------------------

def test_structure_of_constructors_and_non_structures():
    assert am.causal().structure().causal
    assert am.sliding_window(5).structure().window == 5
    assert (am.causal() | am.sliding_window(2)).structure() is None
    assert (~am.causal()).structure() is None
    assert am.from_mod(lambda b, h, q, k: q >= k).structure() is None
    assert (am.causal() & am.from_mod(lambda b, h, q, k: q >= k)).structure() is None


def test_conjoin_rules():
    p = torch.tensor([3, 1])
    assert conjoin(MaskStructure(window=4), MaskStructure(window=2)).window == 2
    strict = conjoin(MaskStructure(causal=True), MaskStructure(causal=True, prefix_lengths=p))
    assert strict.causal and strict.prefix_lengths is None
    both = conjoin(MaskStructure(causal=True, prefix_lengths=p), MaskStructure(causal=True, prefix_lengths=p.flip(0)))
    assert both.prefix_lengths.tolist() == [1, 1]
    assert conjoin(MaskStructure(chunk_size=4), MaskStructure(chunk_size=8)).chunk_size == 4
    assert conjoin(MaskStructure(chunk_size=3), MaskStructure(chunk_size=4)) is None
    d1, d2 = torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1]])
    assert conjoin(MaskStructure(q_document_ids=d1, kv_document_ids=d1),
                   MaskStructure(q_document_ids=d2, kv_document_ids=d2)) is None


# -- property tests ----------------------------------------------------------------------------------

@st.composite
def leaves(draw):
    kind = draw(st.sampled_from(["full", "causal", "window", "chunk", "padding", "document", "prefix", "user"]))
    if kind == "full":
        return am.full()
    if kind == "causal":
        return am.causal()
    if kind == "window":
        return am.sliding_window(draw(st.integers(1, 6)))
    if kind == "chunk":
        return am.chunked(draw(st.integers(1, 6)))
    if kind == "padding":
        rows = draw(st.lists(st.lists(st.booleans(), min_size=K, max_size=K), min_size=B, max_size=B))
        return am.padding(torch.tensor(rows))
    if kind == "document":
        cuts = draw(st.lists(st.lists(st.integers(0, 1), min_size=K, max_size=K), min_size=B, max_size=B))
        ids = torch.tensor(cuts).cumsum(-1)
        sorted_ids = draw(st.booleans())
        q_ids = ids[:, :Q] if sorted_ids else ids[:, :Q].flip(-1)
        return am.document(q_ids, ids)
    if kind == "prefix":
        return am.prefix_lm(torch.tensor(draw(st.lists(st.integers(0, K + 2), min_size=B, max_size=B))))
    offset = draw(st.integers(-3, 3))
    return am.from_mod(lambda b, h, q, k: (q - k + h) % 3 != offset % 3, per_batch=False)


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(leaves())
    op = draw(st.sampled_from(["and", "or", "not"]))
    a = draw(masks(depth=depth - 1))
    if op == "not":
        return ~a
    b = draw(masks(depth=depth - 1))
    return a & b if op == "and" else a | b


def dense(mask):
    return mask.keep(B, H, Q, K).expand(B, H, Q, K)


@settings(max_examples=60, deadline=None)
@given(masks(), masks())
def test_de_morgan_idempotence_double_negation(a, b):
    assert dense(~(a & b)).equal(dense(~a | ~b))
    assert dense(~(a | b)).equal(dense(~a & ~b))
    assert dense(a & a).equal(dense(a)) and dense(a | a).equal(dense(a))
    assert dense(~~a).equal(dense(a))
    assert dense(a & b).equal(dense(a) & dense(b)) and dense(a | b).equal(dense(a) | dense(b))


@settings(max_examples=60, deadline=None)
@given(masks(), st.data())
def test_materialized_equals_predicate(mask, data):
    keep = dense(mask)
    for _ in range(5):
        b, h = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, H - 1))
        q, k = data.draw(st.integers(0, Q - 1)), data.draw(st.integers(0, K - 1))
        value = mask.mask_mod(*(torch.tensor(i) for i in (b, h, q, k)))
        assert bool(value) == bool(keep[b, h, q, k])


@settings(max_examples=60, deadline=None)
@given(st.lists(leaves(), min_size=1, max_size=3), st.integers(1, 5), st.integers(1, 4))
def test_structure_and_block_states_match_the_dense_mask(parts, block_q, block_k):
    mask = parts[0]
    for part in parts[1:]:
        mask = mask & part
    structure = mask.structure()
    if structure is None:
        return
    keep = dense(mask)[:, 0]  # structured masks do not depend on the head
    assert structure.keep(Q, K, batch=B)[:, 0].expand_as(keep).equal(keep)
    tile = structure.tile(2, 9, 1, 12)
    expected = keep[:, 2:9, 1:12]
    assert (expected.all() if tile is None else tile[:, 0].expand_as(expected).equal(expected))
    any_keep, all_keep = block_states(structure, Q, K, block_q, block_k)
    for i in range(any_keep.shape[1]):
        for j in range(any_keep.shape[2]):
            rect = keep[:, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            per_batch_any, per_batch_all = rect.flatten(1).any(-1), rect.flatten(1).all(-1)
            assert any_keep[:, i, j].expand(B).equal(per_batch_any)  # exact
            assert all_keep[:, i, j].expand(B).equal(per_batch_all)  # exact
    lo, hi, exact = (t.expand(B, Q) for t in row_intervals(structure, Q, K))
    for b in range(B):
        for i in range(Q):
            kept = keep[b, i].nonzero().flatten()
            if len(kept):  # every kept key lies in [lo, hi); "exact" means all of [lo, hi) is kept
                assert lo[b, i] <= kept.min() and kept.max() < hi[b, i]
            assert not exact[b, i] or bool(keep[b, i, lo[b, i]:hi[b, i]].all())
    covered = torch.zeros(B, Q, dtype=torch.int64)
    for g in plan_groups(lo, hi, exact, chunk=block_q):
        rows = keep[g.b0:g.b1, g.q0:g.q1]
        covered[g.b0:g.b1, g.q0:g.q1] += 1
        assert not rows[..., :g.k0].any() and not rows[..., g.k1:].any()
        if g.full:
            assert rows[..., g.k0:g.k1].all()
    assert (covered == 1).all()  # every (batch row, query) in exactly one group


def test_memo_is_bounded_and_keep_is_fresh():
    mask = am.causal()
    for i in range(10):
        assert mask.cached(i, lambda i=i: i * i) == i * i
    assert len(mask._memo) == 8 and mask.cached(9, lambda: "rebuilt") == 81
    assert mask.cached(0, lambda: "rebuilt") == "rebuilt"  # the oldest entries were dropped
    assert mask.keep(1, 1, 4, 4) is not mask.keep(1, 1, 4, 4)
