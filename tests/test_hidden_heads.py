"""Hidden-dimension gating and removal through task heads: masked-LM heads (dense -> act ->
LayerNorm -> decoder tied to the word embeddings), question answering, token classification,
multiple choice and sequence classification of BERT, RoBERTa, DistilBERT, GPT-2 and Llama.

For each head: all-open gates reproduce the base logits; finalize() equals the gated model in
eval, has exactly ``remaining_parameters()`` parameters and keeps tied weights tied; a head not
listed is refused by name."""
import pytest
import torch
import transformers as T

from learnmask.export import finalize
from learnmask.inject import apply_masks
from learnmask.inject.hidden import StreamCost
from learnmask.stats import count_parameters

OPEN_TOLERANCE, FINALIZE_TOLERANCE = 1e-6, 1e-5  # fp32, max abs diff
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(family: str, **extra):
    if family == "bert":
        return T.BertConfig(**COMMON, **DROP, **extra)
    if family == "roberta":
        return T.RobertaConfig(**COMMON, **DROP, **extra)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0,
                                  attention_dropout=0.0, qa_dropout=0.0, seq_classif_dropout=0.0, **extra)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    return T.LlamaConfig(num_key_value_heads=2, pad_token_id=0, **COMMON, **extra)


# class name -> family; every class newly supported by hidden gating
MODELS = {
    "BertForMaskedLM": "bert", "BertLMHeadModel": "bert", "BertForPreTraining": "bert",
    "BertForQuestionAnswering": "bert", "BertForMultipleChoice": "bert", "BertForNextSentencePrediction": "bert",
    "RobertaForMaskedLM": "roberta", "RobertaForCausalLM": "roberta", "RobertaForQuestionAnswering": "roberta",
    "RobertaForTokenClassification": "roberta", "RobertaForMultipleChoice": "roberta",
    "DistilBertForMaskedLM": "distilbert", "DistilBertForQuestionAnswering": "distilbert",
    "DistilBertForTokenClassification": "distilbert", "DistilBertForMultipleChoice": "distilbert",
    "GPT2ForSequenceClassification": "gpt2", "GPT2ForTokenClassification": "gpt2",
    "GPT2ForQuestionAnswering": "gpt2",
    "LlamaForSequenceClassification": "llama", "LlamaForTokenClassification": "llama",
    "LlamaForQuestionAnswering": "llama",
}
MLM = ["BertForMaskedLM", "RobertaForMaskedLM", "DistilBertForMaskedLM"]
TIED = MLM + ["BertLMHeadModel", "BertForPreTraining", "RobertaForCausalLM"]


def make(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised ``transformers.<name>`` in eval mode (no dropout)."""
    torch.manual_seed(seed)
    extra = {"is_decoder": True} if name in ("BertLMHeadModel", "RobertaForCausalLM") else {}
    return getattr(T, name)(_config(MODELS[name], **extra)).eval()


def inputs(name: str, seed: int = 1) -> dict:
    """Token ids (encoders: with a padded row; multiple choice: ``(batch, choices, seq)``)."""
    g = torch.Generator().manual_seed(seed)
    if MODELS[name] in ("gpt2", "llama"):
        return {"input_ids": torch.randint(5, 100, (2, 7), generator=g)}
    shape = (3, 2, 9) if "MultipleChoice" in name else (3, 9)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, ..., 6:] = 0
    return {"input_ids": torch.randint(5, 100, shape, generator=g), "attention_mask": mask}


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Every ``*logits`` output (start/end, prediction and next-sentence), flattened, concatenated."""
    with torch.no_grad():
        out = model(**batch)
    return torch.cat([value.flatten() for key, value in out.items() if key.endswith("logits")])


def gated(name: str, seed: int = 0, heads: bool = False, **granularities):
    """``make(name)`` with random hard-concrete hidden gates (and ``granularities``): some hidden
    dims closed, some kept with fractional eval values, the first three fully kept. Heads are
    not gated unless asked (Llama's uneven key/value groups would be padded, not counted)."""
    model = make(name)
    handle = apply_masks(model, hidden=True, heads=heads, **granularities)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in handle.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * 3)
        handle.gates["hidden"].log_alpha[:3] = 10.0
        handle.gates["hidden"].log_alpha[3:6] = -10.0
    z = handle.eval_masks()["hidden"]
    assert (z == 0).any() and ((z > 0) & (z < 1)).any() and (z == 1).any()
    return model, handle


@pytest.mark.parametrize("name", MODELS)
def test_open_hidden_gates_reproduce_the_base_logits(name):
    model = make(name)
    batch = inputs(name)
    expected = logits(model, batch)
    handle = apply_masks(model, hidden=True, gate_options={"init_log_alpha": 5.0})
    assert bool((handle.eval_masks()["hidden"] == 1).all())
    assert (logits(model, batch) - expected).abs().max().item() <= OPEN_TOLERANCE
    handle.remove()
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("name", MODELS)
def test_finalize_equals_gated_eval_and_counts_exactly(name):
    model, handle = gated(name)
    batch = inputs(name)
    expected = logits(model, batch)
    plain = finalize(handle)
    assert (logits(plain, batch) - expected).abs().max().item() <= FINALIZE_TOLERANCE
    kept = int((handle.eval_masks()["hidden"] > 0).sum())
    assert plain.get_input_embeddings().weight.shape == (100, kept)
    dense = count_parameters(make(name))
    assert count_parameters(plain) == handle.remaining_parameters() < dense
    assert handle.parameters_for({"hidden": torch.ones(32)}) == dense


@pytest.mark.parametrize("name", TIED)
def test_tied_decoder_stays_tied_and_head_is_sliced_both_ways(name):
    model, handle = gated(name)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    kept = int((handle.eval_masks()["hidden"] > 0).sum())
    plain = finalize(handle)
    decoder = plain.get_output_embeddings()
    assert decoder.weight is plain.get_input_embeddings().weight
    assert decoder.weight.shape == (100, kept) and decoder.in_features == kept
    assert decoder.bias.shape == (100,)  # the vocabulary bias is not d-wide
    dense, norm = _head_dense_and_norm(plain)
    assert dense.weight.shape == (kept, kept) and dense.bias.shape == (kept,)
    assert norm.weight.shape == (kept,) and norm.normalized_shape == (kept,)


def _head_dense_and_norm(model):
    if hasattr(model, "cls"):
        transform = model.cls.predictions.transform
        return transform.dense, transform.LayerNorm
    if hasattr(model, "lm_head"):
        return model.lm_head.dense, model.lm_head.layer_norm
    return model.vocab_transform, model.vocab_layer_norm


@pytest.mark.parametrize("name", MLM)
def test_mlm_with_heads_ffn_and_hidden(name):
    model, handle = gated(name, heads=True, ffn=True)
    with torch.no_grad():
        handle.gates["heads"].log_alpha[0, :2] = -10.0
    batch = inputs(name)
    expected = logits(model, batch)
    plain = finalize(handle)
    assert (logits(plain, batch) - expected).abs().max().item() <= FINALIZE_TOLERANCE
    assert count_parameters(plain) == handle.remaining_parameters() < count_parameters(make(name))
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight


def test_untied_mlm_decoder_is_sliced_and_counted_on_its_own():
    model = T.BertForMaskedLM(_config("bert", tie_word_embeddings=False)).eval()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    handle = apply_masks(model, hidden=True, heads=False)
    with torch.no_grad():
        handle.gates["hidden"].log_alpha.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 3)
    assert (handle.eval_masks()["hidden"] == 0).any()
    batch = inputs("BertForMaskedLM")
    expected = logits(model, batch)
    plain = finalize(handle)
    assert (logits(plain, batch) - expected).abs().max().item() <= FINALIZE_TOLERANCE
    assert count_parameters(plain) == handle.remaining_parameters()
    assert plain.get_output_embeddings().weight.shape == plain.get_input_embeddings().weight.shape
    # 619 per kept dim as in the tied model (below) + the decoder's own 100 x d weight
    assert handle.hidden_stream.cost == StreamCost(b=719.0, c=1.0)


def test_mlm_stream_cost_values():
    # BertForMaskedLM (no pooler), per kept dim: word 100 + position 512 + token type 2 embedding
    # columns, embedding LayerNorm 2, head dense bias 1, head LayerNorm 2 (tied decoder: once);
    # per kept dim squared: the head dense (32 x 32)
    model = make("BertForMaskedLM")
    handle = apply_masks(model, hidden=True)
    assert handle.hidden_stream.cost == StreamCost(b=619.0, c=1.0)
    assert handle.hidden_stream.norms[-1] is model.cls.predictions.transform.LayerNorm
    assert handle.hidden_stream.writers == [model.cls.predictions.transform.dense]


def _double_heads():
    return T.GPT2DoubleHeadsModel(_config("gpt2")).eval()


def _masked_image():
    return T.ViTForMaskedImageModeling(T.ViTConfig(image_size=8, patch_size=4, encoder_stride=4, **COMMON, **DROP))


def _subclass():
    # defined here, not at import: the modeling module imports triton, which must first be
    # imported by test_triton_backend.py under TRITON_INTERPRET=1
    class _CustomBertForMaskedLM(T.BertForMaskedLM):
        """A subclass may change the forward, so it is not taken for its parent."""

    return _CustomBertForMaskedLM(_config("bert"))


@pytest.mark.parametrize("build", [_double_heads, _masked_image, _subclass],
                         ids=["GPT2DoubleHeadsModel", "ViTForMaskedImageModeling", "subclass"])
def test_unlisted_head_is_refused_naming_the_supported_models(build):
    model = build()
    kind = type(model).__name__
    with pytest.raises(ValueError, match=rf"does not know the task head of {kind}; supported models: .*"
                                         r"BertForMaskedLM.*RobertaForMaskedLM.*DistilBertForMaskedLM"):
        apply_masks(model, hidden=True)
    apply_masks(model, heads=True).remove()  # other granularities do not need the head
