import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    # before any test module imports triton (transformers' modeling files may): the triton
    # backend's tests need its CPU interpreter, chosen once at triton's import (see
    # test_triton_backend.py)
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_bert(num_labels: int = 3, layers: int = 2, heads: int = 4, hidden: int = 32):
    """A randomly initialised BERT classifier small enough for unit tests."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).eval()
