"""Results files: one JSON line per finished run, read back validated and counted once per key;
written only where writable, and never twice for one key.

A record is ``{"key", "grid", "row", "config", "metrics", "finished_at"}``. Reading a file, a
line repeating an earlier record exactly is skipped with a warning naming the file and line; a
second, different record of the same key is an error (which one is right cannot be told).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import tempfile

from learnmask.io import append_jsonl, exclusive, numbered_jsonl

logger = logging.getLogger(__name__)

#: The fields of a record and their JSON types.
RECORD_FIELDS = {"key": str, "grid": str, "row": str, "config": dict, "metrics": dict}


class NotWritable(ValueError):
    """A results file or run folder that cannot be written (said before anything trains)."""


class ResultNotWritten(OSError):
    """A finished run whose record could not be written; its checkpoint is kept."""


def make_record(grid: str, label: str, cfg, metrics: dict) -> dict:
    """The record of one finished run of grid ``grid``, row ``label``."""
    return {
        "key": cfg.key(), "grid": grid, "row": label, "config": dataclasses.asdict(cfg), "metrics": metrics,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_record(path: pathlib.Path, number: int, record: dict) -> None:
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            got = "missing" if name not in record else f"a {type(record[name]).__name__}"
            raise ValueError(f"{path}:{number} is not a learnmask result: {name!r} is {got}, expected a "
                             f"{kind.__name__} (a record has {sorted(RECORD_FIELDS)}); fix or remove that line")


def _differences(a: dict, b: dict) -> list[str]:
    names = []
    for part in ("config", "metrics"):
        names += [f"{part}.{k}" for k in sorted(set(a[part]) | set(b[part])) if a[part].get(k) != b[part].get(k)]
    return names or [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_results(path: str | os.PathLike) -> list[dict]:
    """The records of a results file, each run key once, in file order (missing file: ``[]``).

    Raises:
        ValueError: a line that is not JSON, not a record (wrong schema), or a second record of
            a key that differs from the first (both lines named); ``path`` is a folder.
    """
    path = pathlib.Path(path)
    first: dict[str, tuple[int, dict]] = {}
    records = []
    for number, record in numbered_jsonl(path):
        _check_record(path, number, record)
        key = record["key"]
        if key not in first:
            first[key] = (number, record)
            records.append(record)
            continue
        line, earlier = first[key]
        if record == earlier:
            logger.warning("%s:%d repeats the record of line %d (run %s); counted once", path, number, line, key)
            continue
        shown = ", ".join(_differences(earlier, record)[:4])
        raise ValueError(f"{path}:{line} and {path}:{number} both record run {key} but differ ({shown}); "
                         "keep the right one and delete the other line")
    return records


def finished_keys(path: str | os.PathLike) -> set[str]:
    """Keys of the runs recorded in ``path``."""
    return {record["key"] for record in read_results(path)}


def check_writable(path: str | os.PathLike, *, what: str = "results", folder: bool = False) -> None:
    """Make sure ``path`` can be written: a file to be replaced atomically (its folder exists or
    can be made, and a file can be created there), or with ``folder`` a folder to write files in.
    Call it before training anything.

    Raises:
        NotWritable: a file ``path`` that is a folder, or a folder that cannot be made or written.
    """
    path = pathlib.Path(path)
    if path.is_dir() and not folder:
        raise NotWritable(f"{what} file {path} is a folder; expected a file path (say {path / 'results.jsonl'})")
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise NotWritable(f"cannot write {what} to {path}: {error.strerror or error}; nothing was trained. Choose a "
                          "writable place (--results / --work-dir / --out) or fix the folder's permissions") from error


def append_result(path: str | os.PathLike, record: dict) -> bool:
    """Append ``record`` unless its key is recorded already (checked under the file's lock, so
    two processes never both write it); returns whether it was written.

    Raises:
        OSError: the write failed (the file is left as it was).
    """
    path = pathlib.Path(path)
    with exclusive(path):
        if record["key"] in finished_keys(path):
            logger.warning("run %s is recorded in %s already (by another process); this record is not added",
                           record["key"], path)
            return False
        append_jsonl(path, [record], lock=False)
    return True


def claim_file(results_path: str | os.PathLike, key: str) -> pathlib.Path:
    """The lock file a process holds while it trains run ``key`` of the grid of ``results_path``
    (see :func:`learnmask.io.claim`)."""
    path = pathlib.Path(results_path)
    return path.with_name(path.name + ".claims") / f"{key}.lock"
