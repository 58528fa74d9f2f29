"""Preference records (DPO data): one prompt, a ``chosen`` and a ``rejected`` answer, read by the ordinary data path.

Accepted layouts (one file may mix them with plain SFT records; a record is a preference record when it has any of
``prompt``, ``chosen`` or ``rejected``):

- LLaVA-NeXT's DPO layout (``llava/train/train_dpo.py`` ``DPODataset``; e.g. ShareGPTVideo's ``sft_dpo_17k.jsonl``):
  ``{"id", "image"|"video" (optional), "prompt": str, "chosen": str, "rejected": str}`` (other keys, such as
  ``answer`` or ``chosen_score``, are ignored). LLaVA-NeXT strips ``<image>`` from the prompt and puts one in front
  of it; here a prompt whose ``<image>``/``<video>`` placeholders already match the record's images/videos is kept
  as it is, and any other prompt gets that treatment: placeholders removed, one per image then one per video put
  in front (so LLaVA-NeXT's ``<image>`` for a video becomes ``<video>``).
- ``{"id", "image"|"video", "conversations"|"messages": [... ending with a user turn], "chosen", "rejected"}``:
  multi-turn prompts; the answers are the final assistant turn.

Structural problems of the prompt (a non-string ``prompt``, both ``prompt`` and ``conversations``) fail the file
like any malformed record (``formats.py``). Problems of the answers (missing, not a string, empty, ``chosen ==
rejected``) and a prompt ending with an assistant turn quarantine the one record when its sample is loaded, with a
one-line reason naming the record and the field (``check_preference``).

A loaded preference sample holds the chosen answer's ``input_ids``/``labels`` and the rejected one's as
``rejected_input_ids``/``rejected_labels``, with the visual tensors once. ``collate_pairs`` (called by
``Processor.collate`` when a batch holds such samples) makes a batch of ``2B`` rows: the ``B`` chosen rows first,
then the ``B`` rejected rows in the same order (row ``i`` and row ``B + i`` share their prompt and media), plus
``batch["pairs"] = B``. This is the layout of LLaVA-NeXT's ``concatenated_forward`` (chosen first, images
repeated), so one forward pass scores both answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vlmlab.errors import DataError, SampleError

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
ANSWER_KEYS = ("chosen", "rejected")
IMAGE, VIDEO = "<image>", "<video>"  # the LLaVA placeholders data files are written with
REJECTED_PREFIX = "rejected_"  # sample keys of the rejected answer's text tensors


def is_preference(raw: dict) -> bool:
    return any(key in raw for key in PREFERENCE_KEYS)


def parse_preference(raw: dict, n_images: int, n_videos: int, fail: Callable[[str], DataError]):
    """``(messages, answers)`` of a preference record: ``messages`` from its ``prompt`` (None when the prompt is
    in ``conversations``/``messages``, parsed by the caller), ``answers`` the raw ``chosen``/``rejected`` values
    present (checked later, per sample, by ``check_preference``)."""
    answers = {key: raw[key] for key in ANSWER_KEYS if key in raw}
    if "prompt" not in raw:
        return None, answers
    if "conversations" in raw or "messages" in raw:
        raise fail("has both 'prompt' and 'conversations' (or 'messages'); use one")
    prompt = raw["prompt"]
    if not isinstance(prompt, str):
        raise fail(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise fail("'prompt' is empty")
    if prompt.count(IMAGE) != n_images or prompt.count(VIDEO) != n_videos:
        # LLaVA-NeXT's rule (train_dpo.py): the placeholders go in front of the question.
        prompt = prompt.replace(IMAGE, "").replace(VIDEO, "").strip()
        prompt = f"{IMAGE}\n" * n_images + f"{VIDEO}\n" * n_videos + prompt
    return [{"role": "user", "content": prompt}], answers


def check_preference(answers: dict, messages: Sequence[dict]) -> tuple[str, str]:
    """The (chosen, rejected) answers, or ``DataError`` naming the field at fault (the caller adds the record)."""
    for key in ANSWER_KEYS:
        if key not in answers:
            raise DataError(f"preference record without '{key}'")
        value = answers[key]
        if not isinstance(value, str):
            raise DataError(f"'{key}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"'{key}' is empty")
    if answers["chosen"] == answers["rejected"]:
        raise DataError("'chosen' and 'rejected' are the same answer")
    if not messages or messages[-1]["role"] != "user":
        raise DataError("the prompt must end with a user turn (the answers are 'chosen' and 'rejected')")
    return answers["chosen"], answers["rejected"]


def encode_pair(answers: dict, messages: list[dict], encode: Callable[[list[dict]], dict]) -> dict[str, Any]:
    """The text tensors of both answers: ``encode(messages + [answer])`` for the chosen one, and the rejected
    one's under ``rejected_*`` keys."""
    chosen, rejected = check_preference(answers, messages)
    good = encode([*messages, {"role": "assistant", "content": chosen}])
    bad = encode([*messages, {"role": "assistant", "content": rejected}])
    return {**good, **{REJECTED_PREFIX + k: v for k, v in bad.items()}}


def is_pair(sample: dict) -> bool:
    return f"{REJECTED_PREFIX}input_ids" in sample


def collate_pairs(processor, samples: Sequence[dict], padding_side: str = "right") -> dict:
    """``B`` preference samples -> one batch of ``2B`` rows: chosen rows ``0..B-1``, then the rejected rows in the
    same order, each with its pair's media; ``batch["pairs"] = B``."""
    if not all(is_pair(s) for s in samples):
        raise SampleError(
            "a batch mixes preference pairs and plain samples; a stage's data must be one or the other"
        )
    chosen = [{k: v for k, v in s.items() if not k.startswith(REJECTED_PREFIX)} for s in samples]
    rejected = [
        {**c, "input_ids": s[f"{REJECTED_PREFIX}input_ids"], "labels": s[f"{REJECTED_PREFIX}labels"]}
        for c, s in zip(chosen, samples)
    ]
    batch = processor.collate(chosen + rejected, padding_side)
    batch["pairs"] = len(samples)
    return batch
