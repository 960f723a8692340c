"""The blocks backend on packed documents: the plan cuts its groups at document starts (one unmasked
group per bidirectional document, reading exactly its keys; causal documents as staircases of their
own; small neighbours merged whole when the cost model prefers one call), and the results stay exact
— three-way against the float64 reference, forward and backward, with and without token gates, GQA,
causal, padding, one-token documents, ids in any order and documents that are not contiguous runs."""

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_attention import FUDGE, mean_err, run

from learnmask.masks import attention as am
from learnmask.masks.structure import MaskStructure
from learnmask.masks.structure_blocks import document_starts, row_intervals
from learnmask.ops import blocks, row_plan
from learnmask.ops.attention import masked_attention
from learnmask.ops.blocks import BlocksBackend
from learnmask.ops.inputs import prepare_inputs
from learnmask.ops.reference import ReferenceBackend


def _check(golden, ref, fast, what):
    """:func:`check_three_way` in float32 with twice its factor, and the floor taken at least relative
    to 1 (the inputs' scale): these layouts are tiny, so an error is a mean over a few elements (the
    plan before document cuts measured up to 4.2x the reference's error on a token gate's gradient
    over 150 such layouts, the new one 2.7x); and a gradient that is exactly 0 in float64 (a row whose
    one key takes all the weight) is a rounding error away from 0 in float32."""
    assert torch.isfinite(fast).all(), f"{what}: blocks is not finite"
    scale = max(golden.abs().mean().item(), 1.0)
    bound = 2 * FUDGE["out" if what == "out" else "grad"] * max(mean_err(ref, golden), 2.0**-23 * scale)
    assert mean_err(fast, golden) <= bound, f"{what}: err(blocks) = {mean_err(fast, golden):.3g} > {bound:.3g}"


def _ids(lengths: list[int], order: list[int] | None = None) -> torch.Tensor:
    """Document id of each position for documents of these lengths (ids in ``order``, default 0, 1, ...)."""
    order = order if order is not None else list(range(len(lengths)))
    return torch.cat([torch.full((n,), order[i], dtype=torch.long) for i, n in enumerate(lengths)])


@st.composite
def layouts(draw, max_len=40):
    """(mask, B, Q, K): packed documents per batch row (one-token documents likely), ids sorted,
    permuted (still contiguous runs) or interleaved (not runs), optionally causal, a window or key padding."""
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, max_len))
    order_kind = draw(st.sampled_from(["sorted", "permuted", "interleaved"]))
    rows = []
    for _ in range(batch):
        lengths, left = [], seq
        while left:
            n = min(left, draw(st.sampled_from([1, 1, 2, 3, 5, 8, 13, 21])))
            lengths.append(n)
            left -= n
        order = list(range(len(lengths)))
        if order_kind != "sorted":
            order = draw(st.permutations(order))
        ids = _ids(lengths, order)
        if order_kind == "interleaved" and seq > 2:
            ids = ids[torch.randperm(seq, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))]
        rows.append(ids)
    ids = torch.stack(rows)
    mask = am.document(ids)
    extra = draw(st.sampled_from(["none", "causal", "window", "padding", "causal&padding"]))
    if "causal" in extra:
        mask = mask & am.causal()
    if extra == "window":
        mask = mask & am.sliding_window(draw(st.integers(1, 9)))
    if "padding" in extra:
        real = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq),
                                          min_size=batch, max_size=batch)))
        mask = mask & am.padding(real)
    return mask, batch, seq, seq


def _starts_reference(ids: torch.Tensor) -> torch.Tensor | None:
    starts = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        seen = set()
        for i, d in enumerate(row):
            if i == 0 or d != row[i - 1]:
                if d in seen:
                    return None  # a document that comes back: not a run
                seen.add(d)
                starts[b, i] = i > 0
    return starts


@settings(max_examples=120, deadline=None)
@given(layouts(), st.sampled_from([0.0, 2e-8, 5e-7]), st.integers(1, 6))
def test_the_plan_covers_each_row_once_and_cuts_at_document_starts(case, call_s, chunk):
    mask, batch, q_len, kv_len = case
    structure = mask.structure()
    keep = mask.keep(batch, 1, q_len, kv_len)[:, 0].expand(batch, q_len, kv_len)
    starts = document_starts(structure, q_len)
    expected = _starts_reference(structure.q_document_ids.expand(batch, q_len))
    assert (starts is None) == (expected is None)
    if starts is not None:
        assert starts.expand(batch, q_len).equal(expected)
    lo, hi, exact = (t.expand(batch, q_len) for t in row_intervals(structure, q_len, kv_len))
    real = row_plan._CALL_S
    row_plan._CALL_S = call_s
    try:
        groups = row_plan.plan_groups(lo, hi, exact, chunk=chunk, work_per_pair=64.0, starts=starts)
    finally:
        row_plan._CALL_S = real
    covered = torch.zeros(batch, q_len, dtype=torch.int64)
    for g in groups:
        rows = keep[g.b0:g.b1, g.q0:g.q1]
        covered[g.b0:g.b1, g.q0:g.q1] += 1
        assert not rows[..., :g.k0].any() and not rows[..., g.k1:].any()
        assert not g.full or rows[..., g.k0:g.k1].all()
        if starts is not None and g.k1 > g.k0:
            # the plan's cuts: a row's document starts, or those all rows share in a plan shared by the batch
            cuts = starts.expand(batch, q_len)[g.b0:g.b1].all(0)
            if cuts[g.q0 + 1:g.q1].any():  # a group holding two documents holds them whole (a merge)
                assert g.q0 == 0 or cuts[g.q0], g
                assert g.q1 == q_len or cuts[g.q1], g
    assert (covered == 1).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_documents_get_groups_of_their_own_reading_exactly_their_keys(causal):
    lengths = [[167, 24, 37, 744, 244, 25, 732, 75], [268, 321, 277, 89, 643, 20, 368, 62]]
    ids = torch.stack([_ids(n) for n in lengths])
    mask = am.document(ids) & am.causal() if causal else am.document(ids)
    q = torch.zeros(2, 8, 2048, 64)
    groups, _ = blocks.plan(prepare_inputs(q, q, q, mask=mask), 64)
    for b, row in enumerate(lengths):
        bounds = torch.tensor([0] + row).cumsum(0).tolist()
        mine = [g for g in groups if g.b0 == b]
        assert all(g.b1 == b + 1 for g in mine)
        for d0, d1 in zip(bounds[:-1], bounds[1:]):
            inside = [g for g in mine if d0 <= g.q0 < d1]
            if d1 - d0 >= 64:  # a large document is never merged with a neighbour
                assert inside and inside[0].q0 == d0 and inside[-1].q1 == d1
                assert all(d0 <= g.k0 and g.k1 <= d1 for g in inside)
                if not causal:
                    assert inside == [row_plan.KVGroup(b, b + 1, d0, d1, d0, d1, True)]
                else:  # a staircase of its own: each group reads keys from the document's start to its last row
                    assert all(g.k0 == d0 and g.k1 == g.q1 for g in inside)
    docs = [g for g in groups if not g.full]
    assert causal or all((g.q1 - g.q0) < 64 for g in docs)  # only small documents merged, partly masked


def test_small_documents_are_merged_whole_into_few_calls():
    gen = torch.Generator().manual_seed(0)
    lengths = [torch.randint(1, 13, (400,), generator=gen).cumsum(0) for _ in range(2)]
    ids = torch.stack([torch.bucketize(torch.arange(2048), n, right=True) for n in lengths])
    q = torch.zeros(2, 8, 2048, 64)
    groups, _ = blocks.plan(prepare_inputs(q, q, q, mask=am.document(ids)), 64)
    documents = int(ids[:, -1].sum()) + 2
    assert len(groups) < documents / 8  # about 630 documents of 1..12 tokens: tens of calls, not one each
    starts = document_starts(am.document(ids).structure(), 2048)
    for g in groups:  # a group of one batch row holds whole documents (a plan shared by the rows may not)
        assert g.b1 > g.b0 + 1 or ((g.q0 == 0 or starts[g.b0, g.q0]) and (g.q1 == 2048 or starts[g.b0, g.q1]))


@pytest.mark.parametrize("gated", [False, True], ids=["fused_backward", "recomputing_backward"])
@settings(max_examples=25, deadline=None)
@given(case=layouts(max_len=30), gqa=st.booleans(), split=st.booleans())
def test_three_way_on_random_document_layouts(gated, case, gqa, split):
    mask, batch, q_len, kv_len = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((gated, q_len, gqa, split)).encode()))
    hq, hkv, d = 4, 2 if gqa else 4, 8
    tensors = (torch.randn(batch, hq, q_len, d, generator=gen, dtype=torch.float64),
               torch.randn(batch, hkv, kv_len, d, generator=gen, dtype=torch.float64),
               torch.randn(batch, hkv, kv_len, d, generator=gen, dtype=torch.float64))
    gates = {}
    if gated:
        # z away from 0 but for removed keys: d/dz = d/d(log z) / z would scale rounding errors by 1 / z
        # where the float64 gradient is exactly 0 (a one-key document: every probability is 1)
        z = 0.25 + 0.75 * torch.rand(batch, kv_len, generator=gen, dtype=torch.float64)
        z[:, ::4] = 0.0
        gates = {"token_gate": z}
    w = torch.randn(batch, hq, q_len, d, generator=gen, dtype=torch.float64)
    golden_out, golden_grads = run(ReferenceBackend(), tensors, gates, mask, torch.float64, w)
    ref_out, ref_grads = run(ReferenceBackend("input"), tensors, gates, mask, torch.float32, w)
    real = row_plan._CALL_S
    row_plan._CALL_S = 0.0 if split else 2e-8  # every document its own group, or small ones merged
    try:
        out, grads = run(BlocksBackend(block_q=4), tensors, gates, mask, torch.float32, w)
    finally:
        row_plan._CALL_S = real
    _check(golden_out, ref_out, out, "out")
    for name, g0, g1, g2 in zip(["q", "k", "v"] + list(gates), golden_grads, ref_grads, grads):
        _check(g0, g1, g2, f"d{name}")


def test_under_dropout_a_row_reads_nothing_outside_its_document(monkeypatch):
    monkeypatch.setattr(row_plan, "_CALL_S", 0.0)
    ids = torch.stack([_ids([5, 1, 9, 1, 16]), _ids([16, 1, 1, 3, 11])])
    mask = am.document(ids)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 32, 8, generator=gen) for _ in range(3))
    other = ids != ids[:, 6:7]  # every document but the one holding row 6 of each batch row
    k2, v2 = k.clone(), v.clone()
    k2[other[:, None, :, None].expand_as(k)] = 1e4
    v2[other[:, None, :, None].expand_as(v)] = -1e4
    outs = []
    for kk, vv in ((k, v), (k2, v2)):
        torch.manual_seed(3)
        outs.append(masked_attention(q, kk, vv, mask=mask, backend=BlocksBackend(block_q=4), dropout_p=0.4))
    same = ~other[:, None, :, None].expand_as(outs[0])
    assert outs[0][same].equal(outs[1][same]) and torch.isfinite(outs[1]).all()


def test_document_starts():
    s = MaskStructure(q_document_ids=torch.tensor([[2, 2, 0, 1, 1], [0, 0, 0, 0, 0]]),
                      kv_document_ids=torch.tensor([[2, 2, 0, 1, 1], [0, 0, 0, 0, 0]]))
    assert document_starts(s, 5).tolist() == [[False, False, True, True, False], [False] * 5]
    interleaved = torch.tensor([[0, 1, 0]])
    assert document_starts(MaskStructure(q_document_ids=interleaved, kv_document_ids=interleaved), 3) is None
    assert document_starts(MaskStructure(causal=True), 5) is None
