"""Dataset files on disk -> validated ``Record``s: LLaVA conversation JSON/JSONL and messages-style records.

Accepted record schemas (one file may mix them):

- LLaVA: ``{"id", "image": str | [str] (optional), "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
  ("user"/"assistant" are accepted in "from" too); LLaVA-NeXT-Video records add ``"video": str | [str]``;
- messages: ``{"id", "images": [str] (optional), "videos": [str] (optional), "messages": [{"role":
  "system"|"user"|"assistant", "content"}]}``;

both with an optional ``"task"`` string. Preference (DPO) records add ``"chosen"`` and ``"rejected"`` answers to a
``"prompt"`` or to a conversation ending with a user turn (``vlmlab.data.preference``). Every problem raises
``DataError`` with one line naming the file and the record (``"{path}: record {i} (id '{id}'): {problem}"``, or
``"{path}: line {n} ..."`` for JSONL).

[Contract] Validation here is structural only. Image files are opened lazily when a sample is loaded (a missing image
quarantines one sample, not the dataset), and ``<image>`` placeholder counts are checked by the processor.
``<video>`` placeholders pair with ``Record.videos`` as ``<image>`` placeholders pair with ``Record.images``: the
k-th ``<video>`` in the text is the k-th video, and the processor checks that the counts match.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.data.preference import is_preference, parse_preference
from vlmlab.errors import DataError

# LLaVA's "from" names -> chat roles; chat role names map to themselves so either spelling is accepted.
ROLE_NAMES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
_MAX_SHOWN = 60  # characters of a user-supplied value quoted in a message


@dataclass
class Record:
    """One validated sample: its images and videos (absolute paths) and its chat turns, in order."""

    id: str
    images: list[str] = field(default_factory=list)
    """Absolute paths, resolved against the image folder (default: the data file's folder); not checked to exist."""
    messages: list[dict] = field(default_factory=list)
    """``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` in file order."""
    task: str | None = None
    """The record's task (e.g. "colour"); None when the file has no task field."""
    source: str = ""
    """Where the record came from, for error messages: ``"<file>: record <i> (id '<id>')"`` (JSONL: ``line <n>``)."""
    videos: list[str] = field(default_factory=list)
    """Absolute video paths, resolved like ``images``; one per ``<video>`` placeholder. Last field, so positional
    construction written before videos existed keeps working."""
    preference: dict | None = None
    """A preference (DPO) record's answers as given, ``{"chosen": ..., "rejected": ...}`` (checked when its sample
    is loaded, see ``vlmlab.data.preference``); None for a plain record. ``messages`` then hold the prompt only."""


def load_records(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[Record]:
    """Read a ``.json`` (a list of records) or ``.jsonl`` (one record per line) dataset file into ``Record``s.

    Relative image and video paths are resolved against ``image_folder`` (default: the data file's folder)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    shown = _one_line(str(path))  # every message names the file as given, on one line
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{shown}: dataset file not found") from None
    except IsADirectoryError:
        raise DataError(f"{shown}: is a directory, not a dataset file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{shown}: not UTF-8 text (byte {err.start})") from None

    suffix = path.suffix.lower()
    if suffix == ".json":
        return _load_json(shown, text, folder)
    if suffix == ".jsonl":
        return _load_jsonl(shown, text, folder)
    raise DataError(f"{shown}: unsupported dataset file type {_quote(suffix)} (expected .json or .jsonl)")


def write_llava_json(path: str | os.PathLike, records: list[dict]) -> None:
    """Write ``records`` (LLaVA-format dicts) as a JSON list, atomically (see ``write_json_atomic``)."""
    write_json_atomic(path, records)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON via a temp file in the same folder, fsync and ``os.replace``.

    Readers see the old file or the new one, never a partial one, even if the writer is killed midway."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_json(path: str, text: str, folder: Path) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
    return [_parse_record(raw, f"{path}: record {i}", folder) for i, raw in enumerate(data)]


def _load_jsonl(path: str, text: str, folder: Path) -> list[Record]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n}: invalid JSON at column {err.colno}: {err.msg}") from None
        records.append(_parse_record(raw, f"{path}: line {n}", folder))
    return records


def _parse_record(raw: Any, where: str, folder: Path) -> Record:
    """Validate one decoded record; ``where`` is "<file>: record <i>" or "<file>: line <n>"."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: record is not an object (got {_type_name(raw)})")
    record_id = _parse_id(raw, where)
    where = f"{where} (id {_quote(record_id)})"

    def fail(problem: str) -> DataError:
        return DataError(_one_line(f"{where}: {problem}"))

    task = raw.get("task")
    if task is not None and not isinstance(task, str):
        raise fail(f"'task' must be a string, got {_type_name(task)}")
    images = [os.path.abspath(folder / image) for image in _parse_paths(raw, ("image", "images"), fail)]
    videos = [os.path.abspath(folder / video) for video in _parse_paths(raw, ("video", "videos"), fail)]
    messages, answers = None, None
    if is_preference(raw):  # DPO records: a prompt and two answers (vlmlab.data.preference)
        messages, answers = parse_preference(raw, len(images), len(videos), fail)
    return Record(
        id=record_id,
        images=images,
        messages=messages if messages is not None else _parse_messages(raw, fail),
        task=task,
        source=where,
        videos=videos,
        preference=answers,
    )


def _parse_id(raw: dict, where: str) -> str:
    if "id" not in raw:
        raise DataError(f"{where}: missing 'id'")
    record_id = raw["id"]
    # bool is an int subclass, but an id of `true` is a mistake, not a number.
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        return str(record_id)
    if not isinstance(record_id, str):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {_type_name(record_id)}")
    if not record_id.strip():
        raise DataError(f"{where}: empty 'id'")
    return record_id


def _parse_paths(raw: dict, names: tuple[str, str], fail) -> list[str]:
    """The media paths under the singular or plural key in ``names`` (e.g. "image"/"images"), as given."""
    keys = [key for key in names if key in raw]
    if len(keys) == 2:
        raise fail(f"has both '{names[0]}' and '{names[1]}'; use one")
    if not keys:
        return []
    key = keys[0]
    value = raw[key]
    if value is None:  # some LLaVA exports write "image": null for text-only samples
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
        raise fail(f"'{key}' must be a string or a list of strings, got {_describe_list(value)}")
    if any(not path.strip() for path in paths):
        raise fail(f"'{key}' contains an empty path")
    return paths


def _parse_messages(raw: dict, fail) -> list[dict]:
    if "conversations" in raw and "messages" in raw:
        raise fail("has both 'conversations' and 'messages'; use one")
    if "conversations" in raw:
        key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in raw:
        key, role_key, text_key = "messages", "role", "content"
    else:
        raise fail("missing 'conversations' (or 'messages')")
    turns = raw[key]
    if not isinstance(turns, list):
        raise fail(f"'{key}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise fail(f"'{key}' is empty")

    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise fail(f"turn {j} is not an object (got {_type_name(turn)})")
        for needed in (role_key, text_key):
            if needed not in turn:
                raise fail(f"turn {j} has no '{needed}'")
        role, text = turn[role_key], turn[text_key]
        if not isinstance(role, str) or role not in ROLE_NAMES:
            valid = ", ".join(ROLE_NAMES)
            raise fail(f"turn {j}: unknown role {_quote(role)} in '{role_key}' (expected one of {valid})")
        if not isinstance(text, str):
            raise fail(f"turn {j}: '{text_key}' must be a string, got {_type_name(text)}")
        messages.append({"role": ROLE_NAMES[role], "content": text})
    return messages


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _describe_list(value: Any) -> str:
    if isinstance(value, list):
        bad = next(item for item in value if not isinstance(item, str))
        return f"a list containing {_type_name(bad)}"
    return _type_name(value)


def _quote(value: Any) -> str:
    """Quote a user-supplied value for a one-line message, shortened and with newlines escaped."""
    text = str(value)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "..."
    return "'" + _one_line(text) + "'"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
