"""Real images for the recipes, offline: Fashion-MNIST from its IDX files (no torchvision).

IDX (LeCun et al., the MNIST format): a big-endian header ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 sizes, then the values in C order. Fashion-MNIST (Xiao, Rasul &
Vollgraf, 2017; MIT) ships as four gzipped IDX files: ``train-images-idx3-ubyte.gz`` (60,000 ×
28 × 28 uint8), ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` (10,000) and
``t10k-labels-idx1-ubyte.gz``. Debian's ``dataset-fashion-mnist`` installs them under
:data:`FASHION_MNIST_FOLDER`.

Legend: ``N`` images, ``H``, ``W`` pixels (28 each).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import struct

import numpy as np
import torch

#: Where Debian's ``dataset-fashion-mnist`` puts the files (``dpkg -L dataset-fashion-mnist``).
FASHION_MNIST_FOLDER = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
INSTALL_HINT = ("install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist` (Debian, about 31 MB, MIT) "
                "or set dataset_path to a folder holding its four IDX files (.gz or plain)")
#: IDX type byte -> numpy dtype (big-endian where it matters).
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, *, what: str = "IDX data") -> np.ndarray:
    """The array an IDX file holds.

    Args:
        data: the file's bytes (already decompressed).
        what: names the source in errors.

    Returns:
        an array of the header's shape and dtype (native byte order).

    Raises:
        ValueError: a bad magic number or type byte, or a length that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{what} is not an IDX file: it starts with {data[:4].hex() or 'nothing'}; "
                         "expected 00 00 <type> <ndim>")
    kind, ndim = data[2], data[3]
    if kind not in IDX_TYPES:
        raise ValueError(f"{what}: unknown IDX type byte 0x{kind:02x}; expected one of "
                         f"{[f'0x{k:02x}' for k in IDX_TYPES]}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{what}: {len(data)} bytes is shorter than its {ndim}-dimension header ({header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[kind]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{what}: {len(data)} bytes; the header (shape {list(shape)}, {dtype}) needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """:func:`parse_idx` of a file, gunzipped when its name ends in ``.gz``.

    Raises:
        FileNotFoundError: no such file; ValueError: see :func:`parse_idx`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found at {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path} is not a gzip file ({error})") from error
    return parse_idx(raw, what=str(path))


@dataclasses.dataclass(frozen=True)
class ImageClassificationData:
    """Images and labels split into train and test.

    Attributes:
        train_images, test_images: ``(N, 1, H, W)`` float32 in [0, 1].
        train_labels, test_labels: ``(N,)`` int64 in ``[0, len(label_names))``.
        label_names: class names, index = label id.
        name: a short name for logs and tables.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    label_names: tuple[str, ...]
    name: str

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


def _idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}; {INSTALL_HINT}")


def _images(folder: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_idx_file(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_idx_file(folder, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} in {folder}: images of shape {list(images.shape)} and labels of "
                         f"shape {list(labels.shape)}; expected (N, 28, 28) and (N,)")
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return pixels, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(path: str | os.PathLike | None = None) -> ImageClassificationData:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017; MIT): 60,000 training and 10,000 test images
    of 28 × 28 grey pixels in 10 classes, with its official split.

    Args:
        path: a folder with the four IDX files (gzipped or not); default
            :data:`FASHION_MNIST_FOLDER` (Debian's ``dataset-fashion-mnist``).

    Raises:
        FileNotFoundError: the folder or a file is missing (the message says how to install it).
        ValueError: a file that is not IDX or whose shapes do not fit.
    """
    folder = pathlib.Path(path) if path else FASHION_MNIST_FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder not found at {folder}; {INSTALL_HINT}")
    train_images, train_labels = _images(folder, "train")
    test_images, test_labels = _images(folder, "t10k")
    return ImageClassificationData(train_images, train_labels, test_images, test_labels, FASHION_MNIST_CLASSES,
                                   "fashion_mnist")
