import importlib.util
import os
import pathlib
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


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test (tiny tensors: more threads only contend on
    shared cores, about 15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(relative: str):
    """A script under the repository (``experiments/...``) imported as a module."""
    path = pathlib.Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert(num_labels: int = 3, layers: int = 2, heads: int = 4, hidden: int = 32):
    """A randomly initialised BERT classifier small enough for unit tests."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).eval()


def synthetic(n, seed):
    """A learnable toy task: the label is whether token 7 occurs."""
    from learnmask.recipe.model import EncodedTexts

    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        seq = torch.randint(10, 100, (length,), generator=g).tolist()
        label = int(torch.rand(1, generator=g) < 0.5)
        if label:
            seq[int(torch.randint(1, length, (1,), generator=g))] = 7
        ids.append([2] + seq + [3])
        labels.append(label)
    return EncodedTexts(ids, labels)


@pytest.fixture
def tiny(monkeypatch):
    """The classification recipe on a tiny BERT and the toy task (no data or model files)."""
    from learnmask.recipe import train as recipe

    def load(cfg):
        torch.manual_seed(cfg.seed)
        return tiny_bert(num_labels=2, layers=2, heads=4), synthetic(96, 0), synthetic(64, 1), 0

    monkeypatch.setattr(recipe, "_load", load)

