"""Records on disk -> processed training samples, with bad samples skipped into a quarantine list.

The processor is the same object the model serves with, so training and inference tensors are identical by
construction. Token ids are cached per record (rendering the chat template is the costly part); images are
decoded on every use so memory stays bounded for large datasets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from vlmlab.data.formats import Record, load_records
from vlmlab.data.preference import encode_pair
from vlmlab.errors import DataError
from vlmlab.processing.layout import picks_front, to_front
from vlmlab.processing.processor import Processor


def load_stage_records(
    files: Sequence[str | os.PathLike], root: str | os.PathLike | None, tasks: Sequence[str] | None
) -> list[Record]:
    """Records of every file (relative to ``root``), keeping only ``tasks`` when given."""
    out: list[Record] = []
    for f in files:
        path = Path(f) if root is None or Path(f).is_absolute() else Path(root) / f
        out += load_records(path)
    if tasks is not None:
        out = [r for r in out if r.task in tasks]
    return out


def mix_front_layout(records: list[Record], fraction: float, seed: int = 0) -> list[Record]:
    """``fraction`` of the multi-image records (a stable choice by id) in the in-the-front layout, the rest as
    they are: LLaVA-NeXT-Interleave trains on both layouts."""
    if fraction <= 0:
        return records
    return [
        dataclasses.replace(r, messages=to_front(r.messages)[0])
        if len(r.images) > 1 and picks_front(r.id, fraction, seed)
        else r
        for r in records
    ]


class SupervisedDataset:
    """``dataset[i]`` -> encoded sample dict, or raises ``DataError`` naming the record and the problem."""

    def __init__(self, records: list[Record], processor: Processor):
        self.records = records
        self.processor = processor
        self._text_cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        proc = self.processor
        try:
            messages, images, videos = proc.load_sample(rec.messages, rec.images, rec.videos)
            text = self._text_cache.get(i)
            if text is None:

                def encode(msgs: list[dict]) -> dict:
                    return proc.encode_text(
                        msgs,
                        proc.image_token_counts(images),
                        video_tokens=proc.video_token_counts(videos),
                        train=True,
                    )

                # A preference record gives both answers' tokens (collated as pairs, vlmlab.data.preference).
                if rec.preference is None:
                    text = encode(messages)
                else:
                    text = encode_pair(rec.preference, messages, encode)
                self._text_cache[i] = text
            visual = proc.encode_visuals(images, videos)
        except DataError as e:
            raise DataError(f"{rec.source or rec.id}: {e}") from None
        return {**text, **visual, "id": rec.id}
