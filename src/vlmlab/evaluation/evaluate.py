"""Score a model on held-out records: accuracy per task, and the blind baseline.

The blind baseline asks the same questions with every image replaced by a blank one (the mean colour, i.e. all
zeros after normalisation). Accuracy minus blind accuracy is the *vision gain*: how much the model actually uses
the image rather than answer priors. Results carry the settings that produced them (template, preprocessing,
decoding), so the numbers can be reproduced.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlmlab.data.formats import Record
from vlmlab.data.world.cvbench import CVBENCH_TASKS
from vlmlab.evaluation.cvbench import letter_match
from vlmlab.io import atomic_write_json, atomic_write_text
from vlmlab.processing.boxes import box_hit
from vlmlab.processing.processor import Processor, model_device, to_device, visual_inputs
from vlmlab.processing.transforms import blank_image


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and surrounding articles, squeeze spaces."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


# Tasks not scored by exact match: task -> scorer(prediction, reference) -> bool. ``ground`` (referring
# expressions): the predicted box's IoU with the reference box is >= 0.5; a malformed answer is a miss. The world's
# CV-Bench tasks: the letter read by Cambrian's parser is the reference letter.
TASK_SCORERS = {"ground": box_hit, **dict.fromkeys(CVBENCH_TASKS, letter_match)}
# Tasks whose answers are longer than the default decoding budget: task -> least new tokens.
TASK_MIN_NEW_TOKENS = {"ground": 64}


def score_answer(task: str | None, prediction: str, reference: str) -> bool:
    """Whether ``prediction`` answers like ``reference``: the task's scorer, else normalised exact match."""
    scorer = TASK_SCORERS.get(task)
    if scorer is not None:
        return bool(scorer(prediction, reference))
    return normalize_answer(prediction) == normalize_answer(reference)


def split_prompt(rec: Record) -> tuple[list[dict], str]:
    """The conversation up to the last assistant turn, and that turn's text (the reference answer)."""
    last = max(i for i, m in enumerate(rec.messages) if m["role"] == "assistant")
    return rec.messages[:last], rec.messages[last]["content"]


@torch.no_grad()
def predict(
    model,
    processor: Processor,
    records: Sequence[Record],
    *,
    blind: bool = False,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> list[str]:
    model.eval()
    device = model_device(model)
    out: list[str] = []
    blank = blank_image(processor.config)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        convs = [split_prompt(r)[0] for r in chunk]
        images = [
            [blank_image(processor.config, image_size(im)) for im in r.images] if blind else r.images
            for r in chunk
        ]
        n_frames = processor.config.video.num_frames if processor.config.video else 0
        videos = [[[blank] * n_frames] * len(r.videos) if blind else r.videos for r in chunk]
        batch = to_device(processor(convs, images, add_generation_prompt=True, videos=videos), device)
        new = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **visual_inputs(batch),
            max_new_tokens=max_new_tokens,
            eos_token_id=processor.eos_token_ids,
            pad_token_id=processor.pad_token_id,
        )
        out += [processor.decode(row) for row in new.tolist()]
    return out


def answer_budget(processor: Processor, records: Sequence[Record]) -> int:
    """New tokens that fit the longest reference answer in this tokenizer's tokens, plus the end of turn: a
    tokenizer that splits an answer word into pieces (one not trained on the task's text) is not cut short."""
    answers = {split_prompt(r)[1] for r in records}
    tok = processor.tokenizer
    return max((len(tok(a, add_special_tokens=False)["input_ids"]) + 2 for a in answers), default=0)


def image_size(source) -> tuple[int, int]:
    """(width, height) of an image given as a PIL image, a path or bytes (read from the header only)."""
    if isinstance(source, Image.Image):
        return source.size
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.size


def evaluate(
    model,
    processor: Processor,
    records: Sequence[Record],
    *,
    blind_baseline: bool = True,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> tuple[dict, list[dict]]:
    """``({"tasks": {task: {"accuracy", "blind_accuracy", "n"}}, "settings": ...}, per-record predictions)``."""
    records = [r for r in records if any(m["role"] == "assistant" for m in r.messages)]
    max_new_tokens = max(
        [
            max_new_tokens,
            *(TASK_MIN_NEW_TOKENS.get(r.task, 0) for r in records),
            answer_budget(processor, records),
        ]
    )
    preds = predict(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    blind = (
        predict(model, processor, records, blind=True, batch_size=batch_size, max_new_tokens=max_new_tokens)
        if blind_baseline
        else [None] * len(records)
    )
    per_task: dict[str, dict[str, float]] = defaultdict(lambda: {"correct": 0, "blind_correct": 0, "n": 0})
    rows = []
    for rec, p, b in zip(records, preds, blind):
        gold = split_prompt(rec)[1]
        ok = score_answer(rec.task, p, gold)
        ok_blind = b is not None and score_answer(rec.task, b, gold)
        t = per_task[rec.task or "all"]
        t["n"] += 1
        t["correct"] += ok
        t["blind_correct"] += ok_blind
        rows.append(
            {
                "id": rec.id,
                "task": rec.task,
                "answer": gold,
                "prediction": p,
                "correct": ok,
                "blind_prediction": b,
                "blind_correct": ok_blind,
            }
        )
    tasks = {
        name: {
            "accuracy": t["correct"] / t["n"],
            "blind_accuracy": t["blind_correct"] / t["n"] if blind_baseline else None,
            "n": t["n"],
        }
        for name, t in sorted(per_task.items())
    }
    template = processor.tokenizer.chat_template or ""
    settings = {
        "decoding": {"do_sample": False, "max_new_tokens": max_new_tokens},
        "processor": {k: v for k, v in vars(processor.config).items()},
        "num_image_tokens": processor.num_image_tokens,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "answer_normalization": "lower-case, punctuation and articles removed, exact match",
        "task_scorers": {task: scorer.__name__ for task, scorer in sorted(TASK_SCORERS.items())},
    }
    return {"tasks": tasks, "settings": settings}, rows


def markdown_table(result: dict) -> str:
    lines = ["| task | n | accuracy | blind | vision gain |", "|---|---:|---:|---:|---:|"]
    for name, t in result["tasks"].items():
        blind = t["blind_accuracy"]
        gain = "" if blind is None else f"{100 * (t['accuracy'] - blind):+.1f}"
        blind_s = "" if blind is None else f"{100 * blind:.1f}"
        lines.append(f"| {name} | {t['n']} | {100 * t['accuracy']:.1f} | {blind_s} | {gain} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, rows: list[dict], out_dir: str | Path) -> None:
    """``eval.json``, ``eval.md`` (atomically) and ``predictions.jsonl`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "eval.json", result)
    atomic_write_text(out_dir / "eval.md", markdown_table(result))
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
