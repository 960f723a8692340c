"""Input masking: cases I1 and I2, properties (hypothesis), edge cases, determinism."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers_for_tests import minilm_tokenizer as load_minilm_tokenizer

from learnmask.masks.inputs import (
    IGNORE_INDEX,
    MaskingVocab,
    ReplacementSplit,
    apply_replacement,
    candidate_mask,
    causal_lm_labels,
    mask_tokens,
    mlm_loss,
    select_spans,
    select_tokens,
    select_whole_words,
)

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
A, B, C = 5, 6, 7
VOCAB = MaskingVocab(mask_token_id=MASK, vocab_size=50, special_ids=(PAD, CLS, SEP, MASK, UNK))


def i1_batch():
    ids = torch.tensor([[CLS, A, B, C, SEP], [CLS, A, SEP, PAD, PAD]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, attention


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_minilm_tokenizer()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- case I1 -------------------------------------------------------------------------------

def test_i1_probability_one_selects_exactly_the_four_real_tokens():
    ids, attention = i1_batch()
    _, labels = mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=1.0, generator=gen())
    expected = torch.tensor([[IGNORE_INDEX, A, B, C, IGNORE_INDEX], [IGNORE_INDEX, A] + [IGNORE_INDEX] * 3])
    assert torch.equal(labels, expected)
    assert int((labels != IGNORE_INDEX).sum()) == 4


def test_i1_probability_zero_changes_nothing_and_the_loss_is_zero_not_nan():
    ids, attention = i1_batch()
    masked, labels = mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=0.0, generator=gen())
    assert torch.equal(masked, ids)
    assert torch.all(labels == IGNORE_INDEX)
    logits = torch.randn(2, 5, VOCAB.vocab_size, requires_grad=True)
    loss = mlm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_i1_with_the_real_minilm_tokenizer(minilm_tokenizer):
    encoding = minilm_tokenizer(["a b c", "a"], padding=True, return_tensors="pt")
    vocab = MaskingVocab.from_tokenizer(minilm_tokenizer)
    _, labels = mask_tokens(encoding["input_ids"], vocab, attention_mask=encoding["attention_mask"],
                            mlm_probability=1.0, generator=gen())
    a, b, c = minilm_tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    assert labels.tolist() == [[-100, a, b, c, -100], [-100, a, -100, -100, -100]]


def test_a_pad_id_equal_to_a_real_token_is_selected_where_attention_says_real():
    ids = torch.tensor([[CLS, A, SEP, A, A]])  # A doubles as the pad id here
    attention = torch.tensor([[1, 1, 1, 0, 0]])
    vocab = MaskingVocab(MASK, 50, (CLS, SEP, MASK))
    _, labels = mask_tokens(ids, vocab, attention_mask=attention, mlm_probability=1.0, generator=gen())
    assert labels.tolist() == [[-100, A, -100, -100, -100]]


# --- case I2 -------------------------------------------------------------------------------

def test_i2_split_over_a_million_positions(minilm_tokenizer):
    vocab = MaskingVocab.from_tokenizer(minilm_tokenizer)
    special = torch.tensor(vocab.special_ids)
    ordinary = vocab.random_ids()
    ids = ordinary[torch.randint(len(ordinary), (1000, 1000), generator=gen(1))]
    masked, labels = mask_tokens(ids, vocab, mlm_probability=1.0, generator=gen(2))
    assert int((labels != IGNORE_INDEX).sum()) == 10**6
    is_mask = masked == vocab.mask_token_id
    unchanged = masked == ids
    replaced = ~is_mask & ~unchanged
    assert abs(is_mask.float().mean().item() - 0.800) <= 0.002
    assert abs(replaced.float().mean().item() - 0.100) <= 0.002
    assert abs(unchanged.float().mean().item() - 0.100) <= 0.002
    assert not torch.isin(masked[replaced], special).any()


def test_random_replacements_never_draw_special_ids_even_when_most_ids_are_special():
    vocab = MaskingVocab(mask_token_id=0, vocab_size=10, special_ids=(0, 1, 2, 3, 4, 5, 6, 7))
    ids = torch.full((100, 1000), 8)
    masked, _ = mask_tokens(ids, vocab, mlm_probability=1.0, split=ReplacementSplit(0.0, 1.0, 0.0), generator=gen())
    assert set(masked.unique().tolist()) == {8, 9}


# --- properties ------------------------------------------------------------------------------

def random_batch(draw_seed: int, rows: int = 64, width: int = 48):
    """Rows of CLS, words of 1-4 tokens, SEP, then padding; word ids -1 outside words."""
    g = gen(draw_seed)
    ids = torch.full((rows, width), PAD)
    attention = torch.zeros(rows, width, dtype=torch.long)
    words = torch.full((rows, width), -1)
    for r in range(rows):
        length = int(torch.randint(2, width + 1, (), generator=g))
        ids[r, :length] = torch.randint(A, 50, (length,), generator=g)
        ids[r, 0], ids[r, length - 1] = CLS, SEP
        attention[r, :length] = 1
        position, word = 1, 0
        while position < length - 1:
            size = min(int(torch.randint(1, 5, (), generator=g)), length - 1 - position)
            words[r, position : position + size] = word
            position, word = position + size, word + 1
    return ids, attention, words


def assert_whole_words(selected, words, candidates):
    for r in range(words.shape[0]):
        for word in words[r].unique().tolist():
            if word >= 0:
                values = selected[r][(words[r] == word) & candidates[r]]
                assert values.all() or not values.any(), f"word {word} of row {r} partly selected"


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_selected_fraction_converges_to_mlm_probability(p, seed):
    ids, attention, words = random_batch(seed % 1000, rows=256)
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    n = int(candidates.sum())
    tokens = select_tokens(candidates, p, generator=gen(seed)).sum().item() / n
    assert abs(tokens - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12
    whole = select_whole_words(words, candidates, p, generator=gen(seed)).sum().item() / n
    assert abs(whole - p) <= 5 * 4 * math.sqrt(p * (1 - p) / n) + 1e-12  # words of up to 4 tokens


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_whole_words_and_spans_are_all_or_none_inside_real_tokens(p, seed):
    ids, attention, words = random_batch(seed % 1000)
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    for select in (select_whole_words, select_spans):
        selected = select(words, candidates, p, generator=gen(seed))
        assert not (selected & ~candidates).any(), f"{select.__name__} chose padding or a special token"
        assert_whole_words(selected, words, candidates)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_spans_stay_within_budget_and_never_cross_padding(p, seed):
    ids, attention, words = random_batch(seed % 1000)
    attention[:, ::7] = 0  # holes of padding inside rows, too
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    selected = select_spans(words, candidates, p, generator=gen(seed))
    assert not (selected & (attention == 0)).any()
    per_row = selected.sum(1)
    assert torch.all(per_row <= torch.ceil(p * candidates.sum(1) + 1e-9))


@settings(max_examples=20, deadline=None)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_inputs_are_never_modified_in_place(p, seed):
    ids, attention, words = random_batch(seed % 1000, rows=8)
    copies = [t.clone() for t in (ids, attention, words)]
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    for selected in (select_tokens(candidates, p, generator=gen(seed)), select_whole_words(words, candidates, p),
                     select_spans(words, candidates, p)):
        apply_replacement(ids, selected, VOCAB, generator=gen(seed))
    mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=p)
    causal_lm_labels(ids, attention)
    for before, after in zip(copies, (ids, attention, words)):
        assert torch.equal(before, after)


def test_spans_fill_close_to_the_budget_with_geometric_lengths():
    ids, attention, words = random_batch(3, rows=512, width=128)
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    selected = select_spans(words, candidates, 0.15, generator=gen(4))
    fraction = selected.sum().item() / candidates.sum().item()
    assert 0.13 <= fraction <= 0.151
    runs = torch.diff(torch.nn.functional.pad(selected.int(), (1, 1)), dim=1)  # +1 where a run starts
    mean_run = selected.sum().item() / (runs == 1).sum().item()
    assert mean_run > 2.5  # spans of several tokens, not single tokens (token masking gives ~1.2)


# --- edges and errors ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batches_give_empty_results(shape):
    ids = torch.zeros(shape, dtype=torch.long)
    masked, labels = mask_tokens(ids, VOCAB, attention_mask=torch.ones(shape), mlm_probability=0.5)
    assert masked.shape == labels.shape == shape
    words = torch.full(shape, -1)
    assert select_whole_words(words, ids.bool(), 0.5).shape == shape
    assert select_spans(words, ids.bool(), 0.5).shape == shape


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_only_special_tokens_give_no_labels_and_zero_loss(p):
    ids = torch.tensor([[CLS, SEP, PAD], [CLS, UNK, SEP]])
    words = torch.tensor([[-1, -1, -1], [-1, 0, -1]])
    candidates = candidate_mask(ids, torch.tensor([[1, 1, 0], [1, 1, 1]]), special_ids=VOCAB.special_ids)
    selections = (select_tokens(candidates, p), select_whole_words(words, candidates, p),
                  select_spans(words, candidates, p))
    for selected in selections:
        masked, labels = apply_replacement(ids, selected, VOCAB)
        assert torch.equal(masked, ids) and torch.all(labels == IGNORE_INDEX)
        assert mlm_loss(torch.randn(2, 3, 50), labels).item() == 0.0


@pytest.mark.parametrize("p", [-0.1, 1.5, 15, float("nan")])
def test_probability_outside_unit_interval_is_a_clear_error(p):
    ids, attention = i1_batch()
    with pytest.raises(ValueError, match="mlm_probability must be in \\[0, 1\\]"):
        mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=p)


def test_probability_one_selects_every_real_word_for_every_strategy():
    ids, attention, words = random_batch(5)
    candidates = candidate_mask(ids, attention, special_ids=VOCAB.special_ids)
    for select in (select_whole_words, select_spans):
        assert torch.equal(select(words, candidates, 1.0), candidates)
        assert not select(words, candidates, 0.0).any()


def test_bad_shapes_and_splits_are_clear_errors():
    ids, attention = i1_batch()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(batch, seq_len\) = \(2, 5\)"):
        mask_tokens(ids, VOCAB, attention_mask=attention[:, :4])
    with pytest.raises(ValueError, match="integer tensor of shape"):
        mask_tokens(ids[0], VOCAB)
    with pytest.raises(ValueError, match="must sum to 1"):
        ReplacementSplit(0.8, 0.1, 0.2)
    with pytest.raises(ValueError, match="no mask token"):
        MaskingVocab(None, 10, ())


def test_same_generator_state_same_mask_different_seed_different_mask():
    ids, attention, _ = random_batch(0)
    first = mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=0.3, generator=gen(7))
    again = mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=0.3, generator=gen(7))
    other = mask_tokens(ids, VOCAB, attention_mask=attention, mlm_probability=0.3, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_causal_labels_keep_eos_when_pad_equals_eos():
    eos = 9
    ids = torch.tensor([[5, 6, eos, eos, eos], [5, eos, eos, eos, eos]])  # eos doubles as padding
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert causal_lm_labels(ids, attention).tolist() == [[5, 6, eos, -100, -100], [5, eos, -100, -100, -100]]


def test_mlm_loss_equals_cross_entropy_over_labelled_positions():
    logits = torch.randn(2, 4, 11, dtype=torch.float64)
    labels = torch.tensor([[3, -100, 5, -100], [-100, -100, -100, 10]])
    expected = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    assert torch.allclose(mlm_loss(logits, labels), expected)


def test_a_special_token_typed_in_the_text_is_never_selected(minilm_tokenizer):
    encoding = minilm_tokenizer(["[CLS] [MASK] hello [SEP] world"], return_special_tokens_mask=True,
                                return_tensors="pt")
    vocab = MaskingVocab.from_tokenizer(minilm_tokenizer)
    candidates = candidate_mask(encoding["input_ids"], encoding["attention_mask"], special_ids=vocab.special_ids,
                                special_tokens_mask=encoding["special_tokens_mask"])
    chosen = minilm_tokenizer.convert_ids_to_tokens(encoding["input_ids"][candidates].tolist())
    assert chosen == ["hello", "world"]
