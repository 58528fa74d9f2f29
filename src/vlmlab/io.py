"""Durable small-file IO: atomic whole-file writes and crash-tolerant JSONL logs.

Role: the one place vlmlab writes configs, eval summaries, metrics and quarantine logs to disk, so a crash or
``kill -9`` never leaves a half-written file behind (RELIABILITY.md T1, T7).

- ``atomic_write_bytes/text/json``: write a temp file in the same directory, flush + fsync it, ``os.replace`` it
  over the target, then fsync the directory. Readers see either the old file or the new one, never a mix; the
  rename is only atomic within one filesystem, hence "same directory".
- ``write_directory``: a whole directory (a saved or exported model) written under a temp name beside the target,
  every file fsynced, then renamed into place: an interrupted save leaves the previous directory or none.
- ``JsonlWriter``: one JSON record per line, flushed and fsynced per record, so a crash loses at most the record
  being written.
- ``read_jsonl``: drops a partial last line (a crash mid-record) but raises ``DataError`` for corruption anywhere
  else, because that cannot come from an interrupted append.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vlmlab.errors import CheckpointError, DataError

__all__ = [
    "JsonlWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "write_directory",
    "read_jsonl",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename/creation/deletion inside ``path`` durable (POSIX: the entry lives in the directory)."""
    if os.name != "posix":  # Windows cannot open a directory for fsync; NTFS journals the rename itself.
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    replaceable: Callable[[Path], bool] = lambda p: True,
    what: str = "a model directory",
    synced: bool = False,
) -> Path:
    """Write a directory atomically: ``write(tmp)`` fills a fresh ``<path>.tmp-<pid>`` beside ``path``, its files
    are fsynced (unless ``synced``: ``write`` did it), then it replaces ``path``, which is moved aside to
    ``<path>.old-<pid>`` first (POSIX cannot rename onto a non-empty directory), put back if the rename fails, and
    deleted after. An existing ``path`` that is not ``replaceable`` (``what`` names what it should be) is refused
    before anything is written. Training checkpoints (``training/checkpoint.py``) and exported models use it."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or not replaceable(path)):
        raise CheckpointError(f"{path}: refusing to overwrite: it exists and is not {what}")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = parent / f"{path.name}.tmp-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an earlier failed write in this process
    tmp.mkdir()
    try:
        write(tmp)
        if not synced:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if path.exists():
        old = parent / f"{path.name}.old-{pid}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # roll back so the previous directory stays under its name
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: after a crash it holds the old bytes or the new, never a mix."""
    path = Path(path)
    # The temp file starts with "." and ends in ".tmp" so globs for the real file never match it, and its name
    # cannot be mistaken for a checkpoint's "<name>.tmp-<pid>" directory (training/checkpoint.py cleans those).
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically; serialisation errors happen before anything is touched."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


class JsonlWriter:
    """Append-only JSON Lines log, durable per record (metrics, eval results, quarantine lists).

    Each ``write`` is one ``write()`` of ``json + "\\n"`` followed by flush and fsync, so a crash loses at most the
    record in flight. Opening in append mode first cuts off a partial last line left by such a crash: appending
    after it would glue two records into one corrupt line in the middle of the file, which ``read_jsonl`` rejects.
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a") -> None:
        if mode not in ("a", "w"):
            raise ValueError(f"JsonlWriter mode must be 'a' or 'w', got {mode!r}")
        self.path = Path(path)
        existed = self.path.exists()
        if mode == "a" and existed:
            _truncate_partial_tail(self.path)
        self._file = open(self.path, mode + "b")  # noqa: SIM115 - closed by close()/__exit__
        if not existed or mode == "w":
            fsync_dir(self.path.parent)  # the new directory entry must survive a crash too

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and make it durable before returning."""
        if not isinstance(record, dict):
            raise TypeError(f"JsonlWriter records must be dicts, got {type(record).__name__}")
        # Serialise first so a bad record raises without writing anything.
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _truncate_partial_tail(path: Path) -> None:
    """Cut the file back to its last newline, dropping a record a crash left half-written."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last newline; a partial line is at most one record long.
        block = 1 << 16
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON Lines file of objects, dropping a partial last line left by a crash mid-write.

    Blank lines are skipped. A last line without a trailing newline is kept if it parses (a file written by
    another tool) and dropped if it does not (an interrupted append). Any other bad line raises ``DataError``
    naming the file and the 1-based line number: an append-only writer cannot produce it, so it is corruption.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read JSONL file ({e.strerror or e})") from e
    lines = data.split(b"\n")
    # After the split the last element is whatever followed the final newline: empty for a clean file.
    last_index = len(lines) - 1
    records: list[dict[str, Any]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        is_partial_tail = i == last_index  # no newline after it
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if is_partial_tail:
                break
            raise DataError(f"{path}:{i + 1}: corrupt JSONL line ({type(e).__name__}: {e})") from e
        if not isinstance(obj, dict):
            if is_partial_tail:
                break
            raise DataError(f"{path}:{i + 1}: JSONL record is a {type(obj).__name__}, expected an object")
        records.append(obj)
    return records
