"""MaskStructure: the semantics written once, and what is derived from them (row intervals, exact block
states, key spans) against dense evaluation of the mask over random sizes, block sizes, paddings and
documents; equality with FlexAttention's own create_block_mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learnmask.masks import attention as am
from learnmask.masks.structure import MaskStructure
from learnmask.masks.structure_blocks import block_states, key_spans, row_intervals


@st.composite
def structured_masks(draw):
    """(mask, B, Q, K): a conjunction of one position mask (causal / prefix / window / chunk / none),
    optionally key padding, optionally documents (sorted or not)."""
    batch = draw(st.integers(1, 3))
    q_len, kv_len = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    same = draw(st.booleans())
    if same:
        kv_len = q_len
    position = draw(st.sampled_from(["none", "causal", "prefix", "window", "chunk", "causal+chunk", "window+chunk"]))
    mask = am.full()
    if position in ("causal", "causal+chunk"):
        mask = am.causal()
    if position == "prefix":
        mask = am.prefix_lm(torch.tensor(draw(st.lists(st.integers(0, kv_len + 2), min_size=batch, max_size=batch))))
    if position in ("window", "window+chunk"):
        mask = am.sliding_window(draw(st.integers(1, 8)))
    if position.endswith("chunk"):
        mask = mask & am.chunked(draw(st.integers(1, 8)))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["right", "left", "holes", "none_real"]))
        real = torch.ones(batch, kv_len, dtype=torch.bool)
        for b in range(batch):
            n = draw(st.integers(0, kv_len))
            if kind == "right":
                real[b, n:] = False
            elif kind == "left":
                real[b, :kv_len - n] = False
            elif kind == "holes":
                real[b] = torch.tensor(draw(st.lists(st.booleans(), min_size=kv_len, max_size=kv_len)))
            else:
                real[b] = False
        mask = mask & am.padding(real)
    if draw(st.booleans()):
        cuts = draw(st.lists(st.integers(0, 1), min_size=max(q_len, kv_len), max_size=max(q_len, kv_len)))
        ids = torch.tensor(cuts).cumsum(0)
        kv_ids, q_ids = ids[:kv_len], ids[:q_len]
        if draw(st.booleans()):  # unsorted: documents need not be contiguous runs
            q_ids = q_ids[torch.randperm(q_len, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))]
        mask = mask & am.document(q_ids.expand(batch, q_len), kv_ids.expand(batch, kv_len))
    return mask, batch, q_len, kv_len


def _dense(mask, batch, q_len, kv_len):
    return mask.keep(batch, 1, q_len, kv_len)[:, 0].expand(batch, q_len, kv_len)


@settings(max_examples=150, deadline=None)
@given(structured_masks(), st.integers(1, 9), st.integers(1, 9))
def test_block_states_are_exact(case, block_q, block_k):
    mask, batch, q_len, kv_len = case
    structure = mask.structure()
    assert structure is not None
    keep = _dense(mask, batch, q_len, kv_len)
    assert structure.keep(q_len, kv_len, batch=batch)[:, 0].expand_as(keep).equal(keep)
    assert structure.mask_mod()(torch.arange(batch).view(-1, 1, 1), torch.tensor(0),
                                torch.arange(q_len).view(1, -1, 1), torch.arange(kv_len).view(1, 1, -1)
                                ).expand_as(keep).equal(keep)
    any_keep, all_keep = block_states(structure, q_len, kv_len, block_q, block_k)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    padded = torch.nn.functional.pad(keep, (0, nk * block_k - kv_len, 0, nq * block_q - q_len))
    inside = torch.nn.functional.pad(torch.ones_like(keep), (0, nk * block_k - kv_len, 0, nq * block_q - q_len))
    tiles = padded.view(batch, nq, block_q, nk, block_k).transpose(2, 3).flatten(-2)
    real = inside.view(batch, nq, block_q, nk, block_k).transpose(2, 3).flatten(-2)
    assert any_keep.expand(batch, nq, nk).equal(tiles.any(-1))  # exact: True iff the tile keeps a pair
    assert all_keep.expand(batch, nq, nk).equal((tiles | ~real).all(-1))


@settings(max_examples=150, deadline=None)
@given(structured_masks())
def test_row_intervals_are_tight_and_key_spans_hold_the_key_conditions(case):
    mask, batch, q_len, kv_len = case
    structure = mask.structure()
    keep = _dense(mask, batch, q_len, kv_len)
    lo, hi, exact = (t.expand(batch, q_len) for t in row_intervals(structure, q_len, kv_len))
    positions = torch.arange(kv_len)
    for b in range(batch):
        for i in range(q_len):
            kept = positions[keep[b, i]]
            if len(kept):  # tight: first and one past the last kept key
                assert (lo[b, i].item(), hi[b, i].item()) == (kept.min().item(), kept.max().item() + 1)
            else:
                assert lo[b, i] == hi[b, i]
            assert bool(exact[b, i]) == bool(keep[b, i, lo[b, i]:hi[b, i]].all())
    spans = key_spans(structure, q_len, kv_len)
    if spans is None:
        assert structure.key_padding is None and structure.q_document_ids is None
        return
    key_only = MaskStructure(q_document_ids=structure.q_document_ids, kv_document_ids=structure.kv_document_ids,
                             key_padding=structure.key_padding).keep(q_len, kv_len, batch=batch)[:, 0]
    for keep_side, (s_lo, s_hi, s_exact) in ((key_only, spans[0]), (key_only.transpose(1, 2), spans[1])):
        for b in range(batch):
            for i in range(keep_side.shape[1]):
                kept = keep_side[b, i].nonzero().flatten()
                if len(kept):
                    assert s_lo[b, i] <= kept.min() and kept.max() < s_hi[b, i]
                else:
                    assert s_lo[b, i] == s_hi[b, i]
                assert bool(s_exact[b, i]) == bool(keep_side[b, i, s_lo[b, i]:s_hi[b, i]].all())


@pytest.mark.parametrize("window", [3, 16, 40])
def test_window_and_padding_block_mask_equals_create_block_mask(window):
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq, block = 3, 200, 16
    real = torch.ones(batch, seq, dtype=torch.bool)
    real[0, 150:] = False  # right padding
    real[1, :70] = False  # left padding
    real[2, 30:32] = False  # holes: the last two keys before the block boundary at 32, and more
    real[2, 100:130] = False
    mask = am.sliding_window(window) & am.padding(real)
    ours = mask.block_mask(batch, 1, seq, seq, block_size=block)
    theirs = create_block_mask(mask.mask_mod, batch, 1, seq, seq, device="cpu", BLOCK_SIZE=block)
    assert ours.kv_num_blocks.equal(theirs.kv_num_blocks)
    assert ours.full_kv_num_blocks.equal(theirs.full_kv_num_blocks)
    if window == 3:  # queries 32..47 x keys 16..31: the window keeps (32, 30), (32, 31), (33, 31), all
        # padding, and the padding keeps keys 16..29, which the window does not reach: no pair is kept
        any_keep, _ = block_states(mask.structure(), seq, seq, block, block)
        assert not any_keep[2, 2, 1] and any_keep[2, 2, 2] and any_keep[0, 2, 1]


def test_structured_constructors_take_their_predicate_from_the_structure():
    for mask in (am.causal(), am.sliding_window(3), am.chunked(4), am.prefix_lm(2), am.full(),
                 am.padding(torch.tensor([[1, 1, 0, 1, 1, 1]])), am.document(torch.tensor([[0, 0, 1, 1, 1, 2]]))):
        structure = mask.structure()
        assert mask.keep(1, 1, 6, 6)[:, 0].equal(structure.keep(6, 6)[:, 0]), mask
    assert am.sliding_window(3).keep(1, 1, 5, 5)[0, 0, 4].tolist() == [False, False, True, True, True]
    assert am.prefix_lm(3).keep(1, 1, 5, 5)[0, 0, 0].tolist() == [True, True, True, False, False]
    assert MaskStructure().tile(0, 2, 0, 2) is None
