"""CV-Bench (Cambrian-1's vision-centric benchmark, SYSTEMS.md §20): reading its files, parsing answers as
Cambrian's evaluation does, and the official score.

**File schema** (HF ``nyu-visionx/CV-Bench``: ``test_2d.jsonl`` / ``test_3d.jsonl`` beside an ``img/`` folder, or
``test*.parquet`` with the images embedded), one record per question::

    idx       int: global index                  type      "2D" or "3D"
    task      "Count", "Relation" (2D), "Depth", "Distance" (3D)
    question  "How many organs are in the image?"
    choices   ["3", "2", "1", "0"]                answer    "(C)"
    prompt    question + " Select from the following choices.\\n(A) 3\\n(B) 2\\n(C) 1\\n(D) 0"
    image     the image (see below)               filename  "img/2D/count/ade20k_10.png"
    source    "ADE20K", "COCO" or "Omni3D"        source_dataset, source_filename: where the image came from
    target_class, target_size (COCO only), bbox (Omni3D only): kept as given, unused by the score

``read_cvbench`` reads it as JSONL, a JSON list, or Parquet (only where pyarrow is installed; vlmlab does not depend
on it). The image is ``image``: a path (relative to the file's folder, or absolute), or HF's image layout
``{"bytes": ..., "path": ...}`` with the encoded file as base64 text (JSON) or raw bytes (Parquet); without
``image`` (the JSONL files), ``filename`` is the path. Every bad record raises ``DataError`` with one line naming
the file, the record (``line n`` / ``record i`` / ``row i``, then its idx) and the field. The embedded world's
CV-Bench file (``vlmlab.data.world.cvbench``) uses its own source names, ``world2d-a``, ``world2d-b`` and
``world3d``, standing in for ADE20K, COCO and Omni3D in the score; one file holds one family, not both.

**The model's prompt** is Cambrian's (``eval/eval/{ade,coco,omni}/*_eval.py``): ``"<image>\\n" + prompt + "\\n" +
"Answer with the option's letter from the given choices directly."``, one user turn, greedy decoding.

**Answer parsing.** ``cambrian`` (the default) is Cambrian's ``extract_mcq_answer`` (``eval/eval/omni/omni_test.py``,
``coco/coco_test.py``): lower-case; keep what follows the last "answer is" / "answer:"; strip spaces, trailing
``.:,``, a leading ``(`` and a trailing ``)``; keep the first character. It is correct when it equals the gold
letter; Cambrian's 3D scorer (``omni_test.py``) also accepts the gold option's text, which after the
one-character cut only ever matches a one-character option (so "table" reads as "t", a miss) and its 2D scorer
(``coco_test.py``) does not. ``lmms-eval`` is ``lmms_eval/tasks/cv_bench/utils.py``: ``re.match(r"[\\(\\s]*([A-Z])
[\\)\\.\\s]*", text, re.IGNORECASE)`` on the stripped text, upper-cased, correct when equal to the gold letter. They
agree on "(A)", "A", "a", "A.", "(a) left"; they differ on sentences: "The answer is B." is B for Cambrian and T for
lmms-eval.

**Score** (the dataset card, lmms-eval's ``cv_bench_default_aggregate_results``): accuracy per source;
2D = (acc_ADE20K + acc_COCO) / 2; 3D = acc_Omni3D; CV-Bench = (2D + 3D) / 2, so not the row average (ADE20K
has far fewer questions than COCO). A part whose source has no rows (a ``--limit``-ed file) is None, and then so
is the overall score.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.data.formats import Record
from vlmlab.errors import DataError
from vlmlab.io import atomic_write_json, atomic_write_text
from vlmlab.processing.image import load_image
from vlmlab.processing.layout import IMAGE

ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CHOICES_INTRO = "Select from the following choices."
CVBENCH_MAX_NEW_TOKENS = 16  # a letter, or a short sentence ending in one ("The answer is (B).")

# The score's three slots and the sources that fill them: the benchmark's own, and the world's stand-ins.
SLOTS = ("2D-a", "2D-b", "3D")
FAMILIES = {"CV-Bench": ("ADE20K", "COCO", "Omni3D"), "world": ("world2d-a", "world2d-b", "world3d")}
SOURCE_SLOT = {source: slot for sources in FAMILIES.values() for source, slot in zip(sources, SLOTS)}
SOURCE_FAMILY = {source: family for family, sources in FAMILIES.items() for source in sources}
TYPES = ("2D", "3D")
METADATA = ("filename", "source_dataset", "source_filename", "target_class", "target_size", "bbox")
_ANSWER = re.compile(r"\(([A-Z])\)")
_MAX_SHOWN = 60


def slot_type(source: str) -> str:
    """The question type ("2D" or "3D") that a source's slot scores."""
    return SOURCE_SLOT[source][:2]


def cvbench_prompt(question: str, choices: Sequence[str]) -> str:
    """The ``prompt`` field as CV-Bench writes it: the question, then one ``(X) option`` line per choice."""
    options = "\n".join(f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(choices))
    return f"{question} {CHOICES_INTRO}\n{options}"


def model_prompt(prompt: str) -> str:
    """The user turn Cambrian's evaluation sends: the image, the ``prompt`` field, the answer instruction."""
    return f"{IMAGE}\n{prompt}\n{ANSWER_INSTRUCTION}"


@dataclass(frozen=True)
class CVBenchItem:
    """One validated CV-Bench question."""

    idx: int | str
    type: str
    """The question type, "2D" or "3D"."""
    task: str
    source: str
    question: str
    prompt: str
    choices: tuple[str, ...]
    answer: str
    """The gold letter, "A" for the file's "(A)"."""
    image: str | bytes
    """An absolute path (checked to exist when read) or the encoded image file."""
    where: str
    """The record in messages: ``"<file>: line 3 (idx 7)"``."""
    metadata: dict = field(default_factory=dict)
    """The optional fields present in the record (``METADATA``), as given."""

    @property
    def gold(self) -> int:
        """Index of the gold choice."""
        return ord(self.answer) - ord("A")


# --- answer parsing ---------------------------------------------------------------------------------------------


def cambrian_parse(response: str) -> str:
    """Cambrian's ``extract_mcq_answer``: the lower-case first character after the last "answer is"/"answer:",
    brackets and trailing ``.:,`` stripped ("" for an empty answer)."""
    text = response.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    text = text.strip().rstrip(".:,").lstrip("(").rstrip(")")
    return text[0] if len(text) > 1 else text


def cambrian_correct(response: str, item: CVBenchItem) -> bool:
    """The parsed answer is the gold letter or, for 3D questions only, the gold option's text."""
    parsed = cambrian_parse(response)
    return parsed == item.answer.lower() or (item.type == "3D" and parsed == item.choices[item.gold])


_LMMS_LETTER = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*", flags=re.IGNORECASE)


def lmms_eval_parse(response: str) -> str:
    """lmms-eval's ``_extract_answer_letter``: the upper-cased first letter, after spaces and "(" ("" if none)."""
    match = _LMMS_LETTER.match(response.strip())
    return match.group(1).upper() if match else ""


def lmms_eval_correct(response: str, item: CVBenchItem) -> bool:
    return lmms_eval_parse(response) == item.answer


# rule name -> (parse(response) -> str, correct(response, item) -> bool)
ANSWER_RULES: dict[str, tuple[Callable[[str], str], Callable[[str, CVBenchItem], bool]]] = {
    "cambrian": (cambrian_parse, cambrian_correct),
    "lmms-eval": (lmms_eval_parse, lmms_eval_correct),
}


def letter_match(prediction: str, reference: str) -> bool:
    """The world's multiple-choice records (reference = the gold letter) scored with Cambrian's parser: the
    normalised exact match of ``evaluate`` would drop the letter "a" as an article."""
    return cambrian_parse(prediction) == reference.strip("()").lower()


# --- the score --------------------------------------------------------------------------------------------------


def cvbench_score(rows: Sequence[Mapping], key: str = "correct") -> dict:
    """Cambrian-1's CV-Bench score of ``rows`` (mappings with "source", "task" and a boolean ``key``).

    Returns ``{"family", "sources": {source: {"accuracy", "n"}}, "tasks": {task: {"accuracy", "n"}}, "2D", "3D",
    "overall"}``: 2D = mean of the two 2D sources' accuracies, 3D = the 3D source's, overall = (2D + 3D) / 2;
    None where a source has no rows. Raises ``DataError`` for an unknown source or for rows of both families."""
    sources: dict[str, list[bool]] = {}
    tasks: dict[str, list[bool]] = {}
    for row in rows:
        source = row["source"]
        if source not in SOURCE_SLOT:
            raise DataError(
                f"CV-Bench score: unknown source {source!r}; valid sources: {', '.join(SOURCE_SLOT)}"
            )
        sources.setdefault(source, []).append(bool(row[key]))
        tasks.setdefault(row["task"], []).append(bool(row[key]))
    families = sorted({SOURCE_FAMILY[s] for s in sources})
    if len(families) > 1:
        raise DataError(f"CV-Bench score: rows mix the sources of {' and '.join(families)}; score them apart")
    family = families[0] if families else "CV-Bench"
    accuracy = {s: sum(v) / len(v) for s, v in sources.items()}
    slot = {SOURCE_SLOT[s]: acc for s, acc in accuracy.items()}
    two_d = (slot["2D-a"] + slot["2D-b"]) / 2 if "2D-a" in slot and "2D-b" in slot else None
    three_d = slot.get("3D")
    return {
        "family": family,
        "sources": {
            s: {"accuracy": accuracy[s], "n": len(sources[s])} for s in FAMILIES[family] if s in sources
        },
        "tasks": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(tasks.items())},
        "2D": two_d,
        "3D": three_d,
        "overall": None if two_d is None or three_d is None else (two_d + three_d) / 2,
    }


# --- reading ----------------------------------------------------------------------------------------------------


def read_cvbench(path: str | os.PathLike) -> list[CVBenchItem]:
    """The questions of a CV-Bench file (``.jsonl``, ``.json`` or ``.parquet``), validated (module docstring)."""
    path = Path(path)
    shown = _one_line(str(path))
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(
            f"{shown}: unsupported CV-Bench file type {suffix!r} (expected .jsonl, .json or .parquet)"
        )
    if not path.is_file():
        raise DataError(f"{shown}: CV-Bench file not found")
    if suffix == ".parquet":
        raws = [(f"{shown}: row {i}", raw) for i, raw in enumerate(_read_parquet(path, shown))]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{shown}: not UTF-8 text (byte {err.start})") from None
        raws = _read_jsonl(text, shown) if suffix == ".jsonl" else _read_json(text, shown)
    items, seen, family = [], {}, None
    for where, raw in raws:
        item = _parse_item(raw, where, path.parent)
        if item.idx in seen:
            raise DataError(f"{item.where}: field 'idx': repeats the idx of {seen[item.idx]}")
        seen[item.idx] = where
        if family is None:
            family = SOURCE_FAMILY[item.source]
        elif SOURCE_FAMILY[item.source] != family:
            raise DataError(
                f"{item.where}: field 'source': {item.source!r} is a {SOURCE_FAMILY[item.source]} source but "
                f"the file's earlier records are {family}'s ({', '.join(FAMILIES[family])})"
            )
        items.append(item)
    if not items:
        raise DataError(f"{shown}: no CV-Bench records")
    return items


def _read_jsonl(text: str, shown: str) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{shown}: line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{shown}: line {n}: invalid JSON at column {err.colno}: {err.msg}") from None
    return out


def _read_json(text: str, shown: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{shown}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{shown}: expected a JSON list of CV-Bench records, got {_type_name(data)}")
    return [(f"{shown}: record {i}", raw) for i, raw in enumerate(data)]


def _read_parquet(path: Path, shown: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{shown}: reading Parquet needs pyarrow, which is not installed (pip install pyarrow)"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(
            f"{shown}: not a readable Parquet file ({_one_line(str(err))[:_MAX_SHOWN]})"
        ) from None


def _parse_item(raw: Any, where: str, folder: Path) -> CVBenchItem:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a CV-Bench record (an object), got {_type_name(raw)}")
    idx = raw.get("idx")
    if isinstance(idx, bool) or not isinstance(idx, (int, str)) or idx == "":
        raise DataError(f"{where}: field 'idx': expected an integer or a non-empty string, got {_shown(idx)}")
    where = f"{where} (idx {_one_line(str(idx))[:_MAX_SHOWN]})"

    def fail(name: str, problem: str):
        raise DataError(f"{where}: field '{name}': {problem}")

    def text(name: str) -> str:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            fail(name, f"expected a non-empty string, got {_shown(value)}")
        return value

    kind, task, source = text("type"), text("task"), text("source")
    if kind not in TYPES:
        fail("type", f"expected '2D' or '3D', got {_shown(kind)}")
    if source not in SOURCE_SLOT:
        fail("source", f"unknown source {_shown(source)}; valid sources: {', '.join(SOURCE_SLOT)}")
    if slot_type(source) != kind:
        fail("type", f"{kind!r}, but source {source!r} holds {slot_type(source)} questions")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
        got = f"a list of {len(choices)}" if isinstance(choices, list) else _shown(choices)
        fail("choices", f"expected a list of 2 to 26 non-empty strings, got {got}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            fail("choices", f"choice {i} is {_shown(choice)}, expected a non-empty string")
    answer = raw.get("answer")
    match = _ANSWER.fullmatch(answer) if isinstance(answer, str) else None
    if match is None or ord(match.group(1)) - ord("A") >= len(choices):
        last = chr(ord("A") + len(choices) - 1)
        fail(
            "answer", f"expected '(X)' with X one of A-{last} ({len(choices)} choices), got {_shown(answer)}"
        )
    return CVBenchItem(
        idx=idx,
        type=kind,
        task=task,
        source=source,
        question=text("question"),
        prompt=text("prompt"),
        choices=tuple(choices),
        answer=match.group(1),
        image=_image(raw, folder, fail),
        where=where,
        metadata={name: raw[name] for name in METADATA if name in raw},
    )


def _image(raw: dict, folder: Path, fail) -> str | bytes:
    """The record's image as an absolute path (which exists) or encoded bytes."""
    image = raw.get("image")
    if image is None:
        if raw.get("filename") is None:
            fail("image", "missing: give 'image' (a path or {'bytes': ...}) or 'filename'")
        return _path(raw["filename"], folder, "filename", fail)
    if isinstance(image, str):
        return _path(image, folder, "image", fail)
    if isinstance(image, dict) and image.get("bytes") is not None:
        data = image["bytes"]
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                fail("image", "'bytes' is not valid base64 text")
        if not isinstance(data, bytes) or not data:
            fail("image", f"'bytes' must be base64 text or raw bytes of an image file, got {_shown(data)}")
        return data
    if isinstance(image, dict) and isinstance(image.get("path"), str):
        return _path(image["path"], folder, "image", fail)
    fail("image", f"expected a path or {{'bytes': ..., 'path': ...}}, got {_shown(image)}")


def _path(value: Any, folder: Path, name: str, fail) -> str:
    if not isinstance(value, str) or not value.strip():
        fail(name, f"expected an image path, got {_shown(value)}")
    path = Path(value) if os.path.isabs(value) else folder / value
    if not path.is_file():
        fail(name, f"image file not found: {_one_line(str(path))}")
    return str(path.resolve())


# --- evaluation -------------------------------------------------------------------------------------------------


def evaluate_cvbench(
    model,
    processor,
    items: Sequence[CVBenchItem],
    *,
    rule: str = "cambrian",
    blind_baseline: bool = True,
    batch_size: int = 64,
    max_new_tokens: int = CVBENCH_MAX_NEW_TOKENS,
) -> tuple[dict, list[dict]]:
    """Answer every question greedily and score it: ``({"score", "blind", "settings"}, per-question rows)``.

    ``score`` is ``cvbench_score`` of the answers; ``blind`` the same with every image replaced by a blank one
    (``evaluate``'s blind baseline; None without it). ``rule``: a name in ``ANSWER_RULES``. Images are decoded
    one batch at a time (an undecodable one names its record)."""
    from vlmlab.evaluation.evaluate import predict  # evaluate.py imports this module for its task scorers

    parse, correct = ANSWER_RULES[rule]
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        records = [_record(item, processor) for item in chunk]
        kwargs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
        preds = predict(model, processor, records, **kwargs)
        blind = (
            predict(model, processor, records, blind=True, **kwargs)
            if blind_baseline
            else [None] * len(chunk)
        )
        for item, p, b in zip(chunk, preds, blind):
            rows.append(
                {
                    "idx": item.idx,
                    "type": item.type,
                    "task": item.task,
                    "source": item.source,
                    "answer": f"({item.answer})",
                    "prediction": p,
                    "parsed": parse(p),
                    "correct": correct(p, item),
                    "blind_prediction": b,
                    "blind_correct": b is not None and correct(b, item),
                }
            )
    result = {
        "score": cvbench_score(rows),
        "blind": cvbench_score(rows, key="blind_correct") if blind_baseline else None,
        "settings": {
            "answer_rule": rule,
            "user_turn": model_prompt("{prompt}"),
            "decoding": {"do_sample": False, "max_new_tokens": max_new_tokens},
            "num_image_tokens": processor.num_image_tokens,
            "n": len(rows),
        },
    }
    return result, rows


def _record(item: CVBenchItem, processor) -> Record:
    image = load_image(item.image, max_pixels=processor.config.max_image_pixels, name=f"{item.where}: image")
    messages = [
        {"role": "user", "content": model_prompt(item.prompt)},
        {"role": "assistant", "content": f"({item.answer})"},
    ]
    return Record(id=str(item.idx), images=[image], messages=messages, task=item.task, source=item.where)


def markdown_table(result: dict) -> str:
    """Per-source accuracy, 2D, 3D and the CV-Bench score (with the blind baseline when there is one), then the
    accuracy per task."""
    score, blind = result["score"], result["blind"]
    head = "| part | n | accuracy | blind |" if blind else "| part | n | accuracy |"
    lines = [head, "|---|---:|---:|---:|" if blind else "|---|---:|---:|"]

    def line(name: str, n: int, value: float | None, blind_value: float | None) -> None:
        cells = [name, str(n), _percent(value)] + ([_percent(blind_value)] if blind else [])
        lines.append("| " + " | ".join(cells) + " |")

    sources = score["sources"]
    family = FAMILIES[score["family"]]
    for part, members in (("2D", family[:2]), ("3D", family[2:])):
        for s in members:
            if s in sources:
                line(s, sources[s]["n"], sources[s]["accuracy"], blind and blind["sources"][s]["accuracy"])
        line(part, sum(sources[s]["n"] for s in members if s in sources), score[part], blind and blind[part])
    line("CV-Bench", sum(s["n"] for s in sources.values()), score["overall"], blind and blind["overall"])
    lines += ["", "| task | n | accuracy |", "|---|---:|---:|"]
    lines += [f"| {t} | {v['n']} | {_percent(v['accuracy'])} |" for t, v in score["tasks"].items()]
    return "\n".join(lines) + "\n"


def write_cvbench_results(result: dict, rows: list[dict], out_dir: str | os.PathLike) -> Path:
    """``cvbench.json``, ``cvbench.md`` and ``cvbench-predictions.jsonl`` into ``out_dir`` (atomically); returns
    the path of ``cvbench.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "cvbench.json", result)
    atomic_write_text(out_dir / "cvbench.md", markdown_table(result))
    atomic_write_text(out_dir / "cvbench-predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out_dir / "cvbench.json"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _shown(value: Any) -> str:
    """A user-supplied value for a one-line message: a string quoted and shortened, a number with its type, a
    container or null by its type."""
    if isinstance(value, str):
        text = _one_line(value)
        return "'" + (text[:_MAX_SHOWN] + "..." if len(text) > _MAX_SHOWN else text) + "'"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{type(value).__name__} {value}"
    return _type_name(value)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
