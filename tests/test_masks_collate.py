"""Word grouping with real fast tokenizers (never by ``##``), entity masking, collators, DataLoader, Trainer."""
import pytest
import torch
from tokenizers_for_tests import SENTENCES, byte_level_bpe, minilm_tokenizer, unigram_sentencepiece

from learnmask.masks.collate import CausalLMCollator, MLMCollator, pad_examples, tokenize_for_mlm
from learnmask.masks.inputs import (
    IGNORE_INDEX,
    batch_word_ids,
    candidate_mask,
    keyword_spans,
    select_char_spans,
    word_ids_from_offsets,
)

TOKENIZERS = {"wordpiece": minilm_tokenizer, "byte_level_bpe": byte_level_bpe,
              "sentencepiece_unigram": unigram_sentencepiece}
TEXT = "Tokenization of unbelievably long words"


def words_of(tokenizer, text):
    """Whitespace words of ``text`` rebuilt from our word ids and the offsets."""
    encoding = tokenizer([text], return_offsets_mapping=True)
    word_ids = batch_word_ids(encoding)[0]
    offsets = encoding["offset_mapping"][0]
    spans = {}
    for token, word in enumerate(word_ids.tolist()):
        if word >= 0:
            start, end = offsets[token]
            spans.setdefault(word, [start, end])[1] = end
    return [text[start:end].strip() for start, end in spans.values()], encoding.tokens(0), word_ids


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_word_ids_group_the_pieces_of_each_word(name):
    tokenizer = TOKENIZERS[name]()
    words, tokens, word_ids = words_of(tokenizer, TEXT)
    assert words == TEXT.split()
    assert max(torch.bincount(word_ids[word_ids >= 0]).tolist()) >= 2  # some word really has several pieces
    if name != "wordpiece":
        assert not any(token.startswith("##") for token in tokens)  # a `##` rule would see one word per piece


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_offsets_give_the_same_words_as_word_ids(name):
    tokenizer = TOKENIZERS[name]()
    texts = ["the quick brown fox", "unbelievably long words here"]
    encoding = tokenizer(texts, padding=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                         return_tensors="pt")
    candidates = candidate_mask(encoding["input_ids"], encoding["attention_mask"],
                                special_tokens_mask=encoding["special_tokens_mask"])
    from_offsets = word_ids_from_offsets(encoding["offset_mapping"], texts, candidates)
    assert torch.equal(from_offsets, batch_word_ids(encoding).masked_fill(~candidates, -1))


def test_text_pairs_never_share_word_ids_across_sequences():
    tokenizer = minilm_tokenizer()
    word_ids = batch_word_ids(tokenizer(["alpha beta"], ["gamma delta"]))[0].tolist()
    assert word_ids == [-1, 0, 1, -1, 2, 3, -1]  # raw word_ids() restart at 0 for the second text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_whole_word_masking_is_all_or_none_with_every_tokenizer(name):
    tokenizer = TOKENIZERS[name]()
    examples = tokenize_for_mlm(tokenizer, SENTENCES)
    collator = MLMCollator(tokenizer, strategy="whole_word", mlm_probability=0.4, seed=0)
    batch = pad_examples(examples, tokenizer.pad_token_id)
    out = collator(examples)
    selected = out["labels"] != IGNORE_INDEX
    assert 0 < selected.sum() < batch["attention_mask"].sum()
    for r in range(len(examples)):
        for word in batch["word_ids"][r].unique().tolist():
            if word >= 0:
                values = selected[r][batch["word_ids"][r] == word]
                assert values.all() or not values.any()


def test_entity_spans_and_keywords_mask_every_token_of_the_entity():
    tokenizer = minilm_tokenizer()
    text = "They flew from New York to San Francisco."
    assert keyword_spans(text, ["new york", "san francisco", "cis"]) == [(15, 23), (27, 40)]
    examples = tokenize_for_mlm(tokenizer, [text], offsets=True)
    collator = MLMCollator(tokenizer, strategy="entity", keywords=["new york"], seed=0)
    labels = collator(examples)["labels"][0]
    chosen = tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
    assert chosen == ["new", "york"]
    examples[0]["entity_spans"] = [(27, 40)]
    labels = MLMCollator(tokenizer, strategy="entity", seed=0)(examples)["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "san francisco"


def test_entity_probability_zero_masks_nothing():
    batch = pad_examples(tokenize_for_mlm(minilm_tokenizer(), ["New York"], offsets=True), 0)
    candidates = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    assert not select_char_spans(batch["offset_mapping"], [[(0, 8)]], candidates, probability=0.0).any()
    assert select_char_spans(batch["offset_mapping"], [[(0, 8)]], candidates).sum() == 2


def test_tokenizer_without_mask_token_is_a_clear_error():
    with pytest.raises(ValueError, match="has no mask token"):
        MLMCollator(byte_level_bpe(with_mask=False))


def test_strategy_without_word_ids_names_the_fix():
    tokenizer = minilm_tokenizer()
    examples = [{"input_ids": ids} for ids in tokenizer(["a b", "c"])["input_ids"]]
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        MLMCollator(tokenizer, strategy="whole_word")(examples)
    with pytest.raises(ValueError, match="unknown strategy 'words'"):
        MLMCollator(tokenizer, strategy="words")


def test_collator_in_a_dataloader_is_deterministic_and_rate_can_change():
    tokenizer = minilm_tokenizer()
    examples = tokenize_for_mlm(tokenizer, SENTENCES, max_length=16)

    def run(rate):
        collator = MLMCollator(tokenizer, mlm_probability=0.15, strategy="span", seed=3)
        loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=collator)
        batches = []
        for batch in loader:
            batches.append(batch)
            collator.mlm_probability = rate
        return batches

    first, again, higher = run(0.15), run(0.15), run(0.9)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(first, again))
    def count(batches):
        return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches[1:])

    assert count(higher) > 3 * count(first)
    assert first[0]["input_ids"].shape == (4, 16)
    assert set(first[0]) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    with pytest.raises(ValueError, match="mlm_probability must be in"):
        MLMCollator(tokenizer).mlm_probability = 1.2


def test_empty_list_of_examples_gives_empty_tensors():
    out = MLMCollator(minilm_tokenizer(), seed=0)([])
    assert out["input_ids"].shape == out["labels"].shape == (0, 0)


def test_causal_collator_keeps_eos_labels_with_pad_equal_to_eos():
    tokenizer = byte_level_bpe(with_mask=False)
    examples = [{"input_ids": ids} for ids in tokenizer(["the fox", "the quick brown fox"])["input_ids"]]
    out = CausalLMCollator(tokenizer)(examples)
    eos = tokenizer.eos_token_id
    short = out["labels"][0]
    assert (short == eos).sum() == 1 and (out["input_ids"][0] == eos).sum() > 1  # padding is eos, its label is not
    assert out["labels"][1].tolist() == examples[1]["input_ids"]


def test_as_data_collator_of_the_hugging_face_trainer(tmp_path):
    pytest.importorskip("accelerate")  # the Trainer needs it
    import transformers

    tokenizer = minilm_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config)
    examples = tokenize_for_mlm(tokenizer, SENTENCES, max_length=16)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                                          logging_steps=1, disable_tqdm=True)
    collator = MLMCollator(tokenizer, strategy="whole_word", mlm_probability=0.3, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_dataloader_workers_draw_different_masks_and_repeat_across_runs():
    tokenizer = minilm_tokenizer()
    examples = tokenize_for_mlm(tokenizer, ["the same sentence is repeated here to be masked"] * 16)

    def run():
        collator = MLMCollator(tokenizer, mlm_probability=0.5, seed=11)
        loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=collator, num_workers=2,
                                             multiprocessing_context="fork")
        return [batch["labels"] for batch in loader]

    first, again = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])  # batches 0 and 1 come from different workers: not copies of one stream


def test_masking_rate_callback_moves_the_rate_inside_the_trainer(tmp_path):
    pytest.importorskip("accelerate")
    import transformers

    from learnmask.control import LinearDecay, LossAdaptiveController
    from learnmask.masks.rate_callback import MaskingRateCallback

    tokenizer = minilm_tokenizer()
    seen = []

    class Recording(MLMCollator):
        def __call__(self, examples):
            batch = super().__call__(examples)
            seen.append(self.mlm_probability)  # the rate this batch was masked at
            return batch

    def train(callback_kwargs, workers=0):
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
        collator = Recording(tokenizer, mlm_probability=0.15, seed=0)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                              report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                                              disable_tqdm=True, dataloader_num_workers=workers)
        trainer = transformers.Trainer(model=transformers.BertForMaskedLM(config), args=args, data_collator=collator,
                                       train_dataset=tokenize_for_mlm(tokenizer, SENTENCES, max_length=16),
                                       callbacks=[MaskingRateCallback(collator, **callback_kwargs)])
        trainer.train()
        return collator

    train({"schedule": LinearDecay(0.5, 0.1, 4)})
    assert seen[:4] == pytest.approx([0.5, 0.4, 0.3, 0.2])  # a 5th batch may be collated ahead, at schedule(4)
    seen.clear()
    controller = LossAdaptiveController(0.2, r_min=0.1, r_max=0.4, max_step=0.05)
    collator = train({"controller": controller})
    assert controller.num_updates == 4 and collator.mlm_probability == controller.ratio
    assert seen[0] == 0.2 and all(0.1 <= r <= 0.4 for r in seen)
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        train({"schedule": LinearDecay(0.5, 0.1, 4)}, workers=1)


def test_readme_input_masking_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "MLMCollator" in block)
    namespace = {"tokenizer": minilm_tokenizer(), "texts": SENTENCES}
    exec(compile(code, "README.md", "exec"), namespace)
    batch = namespace["batch"]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    assert namespace["collator"].mlm_probability == 0.3 and (batch["labels"] != IGNORE_INDEX).any()


def test_a_whole_tokenizer_output_instead_of_a_list_is_a_clear_error():
    with pytest.raises(ValueError, match="examples must be a list of dicts"):
        pad_examples({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}, 0)
    with pytest.raises(ValueError, match="example 0 must be a dict"):
        pad_examples([[1, 2, 3]], 0)


def test_an_explicit_pad_token_id_takes_priority_over_the_tokenizers():
    tokenizer = minilm_tokenizer()
    collator = MLMCollator(tokenizer, pad_token_id=999, mlm_probability=0.0)
    batch = collator([{"input_ids": [101, 2000, 102]}, {"input_ids": [101, 102]}])
    assert batch["input_ids"][1].tolist() == [101, 102, 999]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0]


def test_tokenize_for_mlm_of_no_text_is_no_example():
    assert tokenize_for_mlm(minilm_tokenizer(), []) == []
    assert tokenize_for_mlm(minilm_tokenizer(), [], offsets=True, max_length=8) == []


def _masked_batches(loader):
    """Per batch: True if every real token was selected (rate 1), False if none (rate 0)."""
    flags = []
    for batch in loader:
        selected = (batch["labels"] != IGNORE_INDEX).sum().item()
        assert selected == 0 or selected == (batch["attention_mask"].sum().item() - 2 * len(batch["labels"]))
        flags.append(selected > 0)
    return flags


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_rate_schedule_counts_batches_across_dataloader_workers_and_epochs(context):
    """Two workers used to count their own batches: the schedule ran at half speed and restarted
    every epoch. The count is shared now: 16 batches an epoch, rate 1 from batch 8 on."""
    tokenizer = minilm_tokenizer()
    examples = tokenize_for_mlm(tokenizer, [f"sentence number {i} to be masked" for i in range(16)])
    collator = MLMCollator(tokenizer, seed=0, rate_schedule=_StepFunction(8))
    loader = torch.utils.data.DataLoader(examples, batch_size=1, collate_fn=collator, num_workers=2,
                                         multiprocessing_context=context)
    first, second = _masked_batches(loader), _masked_batches(loader)
    assert 4 <= sum(first) <= 12  # about half: which batch near 8 gets which count depends on timing
    assert all(second)  # the second epoch's fresh workers continue the count (16..31)
    assert collator.batches_collated == 32


class _StepFunction:
    """rate 0 before ``step``, 1 from it (picklable, for spawned workers)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, step):
        return 0.0 if step < self.step else 1.0


def test_a_copied_collator_counts_on_its_own():
    import copy
    import pickle

    collator = MLMCollator(minilm_tokenizer(), seed=0, rate_schedule=_StepFunction(1))
    examples = tokenize_for_mlm(minilm_tokenizer(), ["a short text"])
    collator(examples)
    twin, thawed = copy.deepcopy(collator), pickle.loads(pickle.dumps(collator))
    assert twin.batches_collated == thawed.batches_collated == 1
    twin(examples)
    assert twin.batches_collated == 2 and collator.batches_collated == 1 == thawed.batches_collated
    collator.batches_collated = 10  # what MaskingRateCallback does on resume
    collator(examples)
    assert collator.batches_collated == 11 and collator.mlm_probability == 1.0
