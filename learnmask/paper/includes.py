"""Generated files included verbatim in the paper between marker comments.

In ``paper.md``::

    <!-- include: tables/heads.md -->
    ...the content of paper/tables/heads.md, headings moved two levels down...
    <!-- end include -->

:func:`refresh_includes` rewrites what lies between each pair from the named file (a path
relative to the paper's folder); the text outside the markers is left as it is. Headings
(lines starting with ``#``) move two levels down (``#`` → ``###``), so a table's title sits under
the section that includes it; nothing else changes.
"""
from __future__ import annotations

import pathlib
import re

BEGIN = re.compile(r"^<!-- include: (\S+) -->\n", re.M)
END = "<!-- end include -->\n"
DEMOTE = "##"


def included_text(path: pathlib.Path) -> str:
    """The block that stands between the markers for ``path``: its text, headings demoted."""
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text += "\n"
    return re.sub(r"^#", DEMOTE + "#", text, flags=re.M)


def refresh_includes(text: str, base: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
    """``text`` with every include block replaced by its file's current content.

    Args:
        text: the paper's Markdown.
        base: the folder include paths are relative to (the paper's own).

    Returns:
        the new text and the included files, in order.

    Raises:
        ValueError: an include without its ``<!-- end include -->`` line, or naming a file that
            does not exist (the message gives the line number).
    """
    out, files, position = [], [], 0
    for begin in BEGIN.finditer(text):
        if begin.start() < position:
            continue  # (a marker inside a block being replaced cannot happen: blocks hold no "<!-- include")
        line = text.count("\n", 0, begin.start()) + 1
        end = text.find(END, begin.end())
        if end < 0 or (text.find("<!-- include: ", begin.end(), end) >= 0):
            raise ValueError(f"line {line}: <!-- include: {begin.group(1)} --> has no {END.strip()} line after it")
        path = base / begin.group(1)
        if not path.is_file():
            raise ValueError(f"line {line}: included file {path} does not exist")
        out += [text[position:begin.end()], included_text(path)]
        files.append(path)
        position = end
    out.append(text[position:])
    return "".join(out), files
