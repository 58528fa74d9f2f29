"""The world's preference pairs for DPO (LLaVA-NeXT-Video's last stage): the ``video`` task's clips, each with its
true direction as the chosen answer and the opposite direction as the rejected one.

Why the opposite direction: it is the answer of the same clip played backwards, so the pair differs exactly in
what the task is about (the frames' order); a model that ignores the order cannot prefer either answer.

``write_preferences(world_dir)`` reads ``<split>.json`` of a world built with ``extra_tasks=("video",)`` and writes
``preferences-<split>.json`` next to it in LLaVA-NeXT's DPO layout (``vlmlab.data.preference``), the clips shared
with the SFT records: ``{"id", "video", "prompt", "chosen", "rejected", "task": "video"}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmlab.data.formats import write_llava_json
from vlmlab.errors import DataError

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PREFERENCE_FILE = "preferences-{split}.json"


def preference_records(records: list[dict]) -> list[dict]:
    """One preference record per ``video`` record (LLaVA JSON dicts as the world writes them)."""
    out = []
    for rec in records:
        if rec.get("task") != "video":
            continue
        turns = rec["conversations"]
        prompt, answer = turns[0]["value"], turns[1]["value"]
        out.append(
            {
                "id": f"{rec['id']}-pref",
                "video": rec["video"],
                "prompt": prompt,
                "chosen": answer,
                "rejected": OPPOSITE[answer],
                "task": "video",
            }
        )
    return out


def write_preferences(world_dir: str | os.PathLike, split: str = "train") -> Path:
    """Write ``preferences-<split>.json`` from the world's ``<split>.json``; returns its path."""
    world_dir = Path(world_dir)
    records = json.loads((world_dir / f"{split}.json").read_text(encoding="utf-8"))
    pairs = preference_records(records)
    if not pairs:
        raise DataError(
            f"{world_dir / f'{split}.json'}: no video records (build the world with the video task)"
        )
    path = world_dir / PREFERENCE_FILE.format(split=split)
    write_llava_json(path, pairs)
    return path
