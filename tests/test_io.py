"""Tests for vlmlab.io: atomic whole-file writes and crash-tolerant JSONL (RELIABILITY.md T1, T7).

Compared against the contract itself: after a failure or a ``kill -9`` the file holds the old or the new content
(never a mix), no temp files remain, and a JSONL log loses at most its last partial line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from vlmlab.errors import DataError
from vlmlab.io import JsonlWriter, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_writes_round_trip(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a.txt", "héllo")
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2.5, None]})
    atomic_write_json(tmp_path / "a.json", {"x": "new"})  # overwrite
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.txt"]


def test_atomic_write_json_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"version": "old"})
    old_bytes = target.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")  # as if the disk filled up at the last moment

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(target, {"version": "new", "payload": "x" * 10_000})
    monkeypatch.undo()

    assert target.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_atomic_write_json_unserialisable_touches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_jsonl_writer_and_reader_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with JsonlWriter(path) as w:
        w.write({"step": 1, "loss": 0.5})
        w.write({"step": 2, "loss": float("inf")})
    with JsonlWriter(path) as w:  # append mode by default
        w.write({"step": 3, "note": "ünïcode"})
    assert read_jsonl(path) == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": float("inf")},
        {"step": 3, "note": "ünïcode"},
    ]
    with JsonlWriter(path, mode="w") as w:
        w.write({"step": 0})
    assert read_jsonl(path) == [{"step": 0}]


def test_read_jsonl_drops_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # kill -9 in the middle of record 3
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    # A complete last record without its newline (another tool wrote it) is kept.
    path.write_bytes(b'{"step": 1}\n{"step": 2}')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_jsonl_append_after_partial_line_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo')
    with JsonlWriter(path) as w:
        w.write({"step": 2})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'{"a": 1}\n{"a": 2\n{"a": 3}\n', 2),
        (b'{"a": 1}\n[1, 2]\n', 2),
        (b'{"a": 1}\n\n\xff\xfe\n{"a": 3}\n', 3),
    ],
)
def test_read_jsonl_corrupt_middle_line_raises(tmp_path: Path, content: bytes, line: int) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"m\.jsonl:{line}:") as info:
        read_jsonl(path)
    assert "\n" not in str(info.value)


def _write_forever(path: Path, first: int, ready_fd: int) -> None:
    """Child body: append records as fast as possible until killed."""
    with JsonlWriter(path) as w:
        os.write(ready_fd, b"r")
        i = first
        while True:
            w.write({"i": i, "pad": "x" * 2000})
            i += 1


@pytest.mark.skipif(
    not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL"
)
def test_jsonl_survives_kill_9(tmp_path: Path) -> None:
    """T7: kill -9 the writer at random moments; the log always parses and holds a gap-free prefix.

    The writer is a fork of this process rather than a fresh interpreter: ``import vlmlab`` costs seconds, a fork
    costs nothing, and the child only runs ``JsonlWriter`` before it is killed.
    """
    path = tmp_path / "metrics.jsonl"
    rng = random.Random(1234)  # seeded kill timing
    n = 0
    for _ in range(6):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.close(ready_r)
                _write_forever(path, n, ready_w)
            finally:
                os._exit(1)
        os.close(ready_w)
        try:
            assert os.read(ready_r, 1) == b"r"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(ready_r)
        records = read_jsonl(path)
        assert [r["i"] for r in records] == list(range(len(records)))
        assert len(records) >= n
        n = len(records)
    assert n > 0
