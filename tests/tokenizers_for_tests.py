"""Real fast tokenizers of three kinds for the input-masking tests (built once per process).

* WordPiece: all-MiniLM-L6-v2's own ``tokenizer.json`` (pieces continue with ``##``).
* Byte-level BPE (GPT-2/RoBERTa style): trained here on a few sentences; pieces carry no ``##``,
  a word starts with ``Ġ``; ``pad == eos`` like GPT-2, and no mask token.
* Unigram with the SentencePiece ``▁`` word marker: trained here on the same sentences.
"""
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Tokenization of unbelievably long words exercises subword vocabularies.",
    "Shakespeare wrote comedies, tragedies and histories in London.",
    "A byte-level tokenizer splits rare words into several pieces.",
    "New York and San Francisco are cities; Paris is a capital.",
] * 4


@functools.cache
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from learnmask.recipe.model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _wrap(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@functools.cache
def byte_level_bpe(with_mask: bool = True):
    """Byte-level BPE with ``<s> ... </s>`` around each text, ``pad = eos`` (GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>"] + (["<mask>"] if with_mask else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    extra = {"mask_token": "<mask>"} if with_mask else {}
    return _wrap(tok, bos_token="<s>", eos_token="</s>", pad_token="</s>", **extra)


@functools.cache
def unigram_sentencepiece():
    """Unigram model with the Metaspace (``▁``) pre-tokenizer, as SentencePiece tokenizers use."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "<unk>", "<cls>", "<sep>", "<mask>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <sep> <cls>",
        special_tokens=[("<sep>", tok.token_to_id("<sep>")), ("<cls>", tok.token_to_id("<cls>"))])
    return _wrap(tok, pad_token="<pad>", unk_token="<unk>", cls_token="<cls>", sep_token="<sep>", mask_token="<mask>")
