"""Numbers the paper quotes, each tied to the cell or value it was read from.

A quote is a number followed at once by an HTML comment naming its source (invisible when the
Markdown is rendered)::

    hard-concrete at 90% keeps 92.2<!-- tables/heads.md: hard-concrete gates + Lagrangian | 90% | Accuracy (%) -->%
    ... −2.3<!-- tables/heads.md: after within 2.5 points of dense: --> points ...
    ... 0.61×<!-- results/bench-attention-gpu.json: cases.0.speed_vs_flex.fwd --> ...

Sources (paths relative to the paper's folder):

- **cell** ``tables/X.md: A | B | Column``: the row of X's Markdown table whose first cells are
  ``A``, ``B`` (as many as given; exactly one row must match) and the column headed ``Column``
  (``Column#2``: the second column of that header). The quote must equal the cell's first number.
- **after** ``tables/X.md: after TEXT``: the first number after ``TEXT``, which must occur exactly
  once in X (goal lines, notes, the prose under a table).
- **JSON** ``results/X.json: key.0.key``: a value of a JSON file, by keys and list indices;
  the quote must equal it rounded to the quote's decimals.

Numbers compare as written, after ``−`` → ``-``, a leading ``+`` and thousands commas are
dropped: ``93.9`` matches ``93.9`` and not ``93.90``; ``−2.3`` matches ``-2.3``, not ``2.3``.

Every other decimal number in the prose must be declared as no table's number in one comment,
``<!-- numbers not from tables: 0.9 2.5 ... -->`` (:func:`unmarked_numbers`); text inside
include blocks, code spans and comments is not prose.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

NUMBER = r"[-−+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(r"(?<![\w.])" + NUMBER)
QUOTE = re.compile(r"(?<![\w.])(" + NUMBER + r")(%|×)?<!-- ((?:tables|results)/[^:\s]+): (.*?) -->")
_DECLARED = re.compile(r"<!-- numbers not from tables: (.*?) -->", re.S)
_DECIMAL = re.compile(r"(?<![\w.])[-−+]?\d+\.\d+(?!\.?\d)")  # (units may follow: 1.8M; not 2.13.0)


def normalize(number: str) -> str:
    """``"−1,234.5"`` → ``"-1234.5"``; ``"+0.4"`` → ``"0.4"``."""
    return number.replace("−", "-").replace(",", "").lstrip("+")


@dataclasses.dataclass(frozen=True)
class Quote:
    """One quoted number: its text, its source file (relative to the paper) and selector, and
    the line of the paper it is on (1-based)."""

    number: str
    source: str
    selector: str
    line: int


def find_quotes(text: str) -> list[Quote]:
    """Every quote in ``text`` (the paper's Markdown), in order."""
    return [Quote(m.group(1), m.group(3), m.group(4).strip(), text.count("\n", 0, m.start()) + 1)
            for m in QUOTE.finditer(text)]


def markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and body rows (cells stripped) of the first pipe table in ``text``.

    Raises:
        ValueError: ``text`` has no pipe table.
    """
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        raise ValueError("no Markdown table")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    return rows[0], rows[2:]


def cell(text: str, selector: str) -> str:
    """The cell ``selector`` (``"A | B | Column"``) names in the table of ``text``.

    Raises:
        ValueError: no or several rows match, or no such column (the message lists the choices).
    """
    *key, column = [part.strip() for part in selector.split(" | ")]
    header, rows = markdown_rows(text)
    name, _, nth = column.partition("#")
    where = [i for i, head in enumerate(header) if head == name]
    if not where or len(where) < int(nth or 1) or (len(where) > 1 and not nth):
        raise ValueError(f"column {column!r}: the columns are {header} (Name#2 for a repeated one)")
    matches = [row for row in rows if row[: len(key)] == key]
    if len(matches) != 1:
        shown = [" | ".join(row[: max(1, len(key))]) for row in rows]
        raise ValueError(f"row {' | '.join(key)!r} matches {len(matches)} rows; expected 1 of {shown}")
    return matches[0][where[int(nth or 1) - 1]]


def after(text: str, marker: str) -> str:
    """The text after the one occurrence of ``marker`` in ``text`` (to the end of its line).

    Raises:
        ValueError: ``marker`` occurs 0 or 2+ times.
    """
    count = text.count(marker)
    if count != 1:
        raise ValueError(f"{marker!r} occurs {count} times; expected once")
    start = text.index(marker) + len(marker)
    return text[start: text.find("\n", start) if "\n" in text[start:] else len(text)]


def json_value(data, path: str):
    """``data`` at ``path`` (``"cases.0.speed_vs_flex.fwd"``).

    Raises:
        ValueError: a key or index that is not there.
    """
    for part in path.split("."):
        try:
            data = data[int(part)] if isinstance(data, list) else data[part]
        except (KeyError, IndexError, ValueError, TypeError) as error:
            raise ValueError(f"{path!r}: no {part!r} there") from error
    return data


def expected(quote: Quote, *, tables: pathlib.Path, results: pathlib.Path) -> str:
    """The number the quote's source holds, written as the quote must write it.

    Raises:
        ValueError: the source or selector does not name a number.
    """
    folder, _, name = quote.source.partition("/")
    path = (tables if folder == "tables" else results) / name
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    if path.suffix == ".json":
        value = json_value(json.loads(path.read_text(encoding="utf-8")), quote.selector)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{quote.selector!r} is {value!r}, not a number")
        decimals = len(normalize(quote.number).partition(".")[2])
        return f"{value:.{decimals}f}"
    text = path.read_text(encoding="utf-8")
    if quote.selector.startswith("after "):
        source = after(text, quote.selector[len("after "):])
    else:
        source = cell(text, quote.selector)
    found = _NUMBER.search(source)
    if found is None:
        raise ValueError(f"no number in {source.strip()!r}")
    return normalize(found.group(0))


def check_quotes(text: str, *, tables: pathlib.Path, results: pathlib.Path) -> list[str]:
    """One line per quote in ``text`` that differs from its source or names none, and per source
    comment that follows no number (a quote the markup does not see); [] when all hold.

    ``tables``/``results``: the folders ``tables/...`` and ``results/...`` sources are read from.
    """
    problems = []
    quoted = {m.start(4) for m in QUOTE.finditer(text)}
    for source in re.finditer(r"<!-- (?:tables|results)/[^:\s]+: (.*?) -->", text):
        if source.start(1) not in quoted:
            line = text.count("\n", 0, source.start()) + 1
            problems.append(f"line {line}: a source comment with no number right before it: {source.group(0)}")
    for quote in find_quotes(text):
        try:
            want = expected(quote, tables=tables, results=results)
        except ValueError as error:
            problems.append(f"line {quote.line}: {quote.number} from {quote.source}: {error}")
            continue
        if normalize(quote.number) != want:
            problems.append(f"line {quote.line}: quotes {quote.number} but {quote.source} "
                            f"[{quote.selector}] holds {want}")
    return problems


def _lines_only(match: re.Match) -> str:
    """What a removed block leaves: its line breaks (so that line numbers stay the source's)."""
    return "\n" * match.group(0).count("\n")


def prose(text: str) -> str:
    """``text`` without include blocks, headings, fenced code, code spans and comments, each quote
    shown as ``⟨quoted⟩`` (what :func:`unmarked_numbers` reads); line breaks are kept, so a line
    of the result is the same line of ``text``."""
    text = re.sub(r"^<!-- include: .*?^<!-- end include -->$", _lines_only, text, flags=re.M | re.S)
    text = re.sub(r"^#.*$", "", text, flags=re.M)
    text = re.sub(r"^```.*?^```$", _lines_only, text, flags=re.M | re.S)
    text = QUOTE.sub(lambda m: "⟨quoted⟩" + _lines_only(m), text)
    text = re.sub(r"<!--.*?-->", _lines_only, text, flags=re.S)
    return re.sub(r"`[^`]*`", "", text)


def unmarked_numbers(text: str) -> list[str]:
    """Decimal numbers in the prose of ``text`` that are neither quotes nor declared in
    ``<!-- numbers not from tables: ... -->``, as ``"93.9 (line N: …context…)"``."""
    declared = {normalize(n) for found in _DECLARED.findall(text) for n in found.split()}
    plain = prose(text)
    lines = []
    for number in _DECIMAL.finditer(plain):
        if normalize(number.group(0)) not in declared:
            context = " ".join(plain[max(0, number.start() - 40): number.end() + 10].split())
            line = plain.count("\n", 0, number.start()) + 1
            lines.append(f"{number.group(0)} (line {line}: …{context}…)")
    return lines
