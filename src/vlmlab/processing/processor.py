"""The one preprocessing path shared by training, evaluation, chat and serving.

conversation + images -> chat template -> token ids with each ``<image>`` expanded to exactly the number of
visual tokens the model produces -> labels (-100 everywhere except assistant replies and their end token) ->
truncation that never cuts through an image -> padded batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer

from vlmlab.config import ProcessorConfig, from_dict
from vlmlab.errors import CheckpointError, SampleError
from vlmlab.processing.chat import render_with_spans
from vlmlab.processing.image import load_image, to_rgb
from vlmlab.processing.transforms import image_to_tensor

IGNORE_INDEX = -100
PROCESSOR_FILE = "processor.json"


class Processor:
    def __init__(self, tokenizer, config: ProcessorConfig, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.config = config
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise SampleError(f"the tokenizer has no {config.image_token!r} token; add it as a special token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id

    # -- single samples ------------------------------------------------------------------------------------
    def load_images(self, sources: Sequence[str | os.PathLike | bytes | Image.Image]) -> list[Image.Image]:
        return [
            to_rgb(s)
            if isinstance(s, Image.Image)
            else load_image(s, max_pixels=self.config.max_image_pixels)
            for s in sources
        ]

    def encode(
        self,
        messages: list[dict],
        images: Sequence[str | os.PathLike | bytes | Image.Image] = (),
        *,
        add_generation_prompt: bool = False,
        train: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """One sample: ``input_ids`` [T], ``labels`` [T], ``pixel_values`` [N_img, 3, S, S] or None.

        Raises ``SampleError`` / ``ImageError`` (one line) when the sample cannot be used as it is."""
        out = self.encode_text(
            messages, len(images), add_generation_prompt=add_generation_prompt, train=train
        )
        return {**out, "pixel_values": self.encode_images(images)}

    def encode_images(self, images: Sequence[str | os.PathLike | bytes | Image.Image]) -> torch.Tensor | None:
        """``[N_img, 3, S, S]`` (None when there are no images)."""
        if not images:
            return None
        return torch.stack([image_to_tensor(im, self.config) for im in self.load_images(images)])

    def encode_text(
        self, messages: list[dict], n_images: int, *, add_generation_prompt: bool = False, train: bool = False
    ) -> dict[str, torch.Tensor]:
        """Token ids with each placeholder expanded to ``num_image_tokens`` ids, and the loss labels."""
        placeholder = self.config.image_token
        n_placeholders = sum(
            m["content"].count(placeholder) for m in messages if isinstance(m.get("content"), str)
        )
        if n_placeholders != n_images:
            raise SampleError(
                f"{n_placeholders} {placeholder} placeholder(s) in the conversation but {n_images} image(s)"
            )
        text, spans = render_with_spans(self.tokenizer, messages, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tok == self.image_token_id:
                ids += [tok] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                continue
            in_reply = any(s <= start and end <= e and start < e for s, e in spans)
            ids.append(tok)
            labels.append(tok if in_reply else IGNORE_INDEX)
        ids, labels = self._truncate(ids, labels)
        if train and all(lab == IGNORE_INDEX for lab in labels):
            raise SampleError("no supervised tokens: every label is masked (no assistant reply left)")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    def _truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        limit = self.config.max_length
        if len(ids) <= limit:
            return ids, labels
        # Any image token at or beyond the cut means an image would be cut through or dropped.
        if self.image_token_id in ids[limit:]:
            raise SampleError(
                f"sample is {len(ids)} tokens, over max_length {limit}, and truncating it would cut through an image"
            )
        return ids[:limit], labels[:limit]

    # -- batches -------------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[dict], padding_side: str = "right") -> dict[str, torch.Tensor | None]:
        """Pad to the longest sample; images of all samples are concatenated in order."""
        T = max(len(s["input_ids"]) for s in samples)
        B = len(samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = s["input_ids"]
            labels[i, sl] = s["labels"]
            attention_mask[i, sl] = 1
        pix = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(pix) if pix else None,
        }

    def __call__(
        self,
        conversations: Sequence[list[dict]],
        images: Sequence[Sequence] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """A left-padded generation batch (the inference path; training calls ``encode`` + ``collate``)."""
        images = images if images is not None else [()] * len(conversations)
        samples = [
            self.encode(c, im, add_generation_prompt=add_generation_prompt)
            for c, im in zip(conversations, images)
        ]
        return self.collate(samples, padding_side="left")

    # -- decoding ------------------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        for i, t in enumerate(ids):  # cut at the first EOS
            if t in self.eos_token_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def stop_checker(self, stop_strings: Sequence[str]) -> Callable[[list[int]], bool] | None:
        if not stop_strings:
            return None
        return lambda ids: any(
            s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in stop_strings
        )

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        settings = {"config": _to_json(self.config), "num_image_tokens": self.num_image_tokens}
        (path / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Processor:
        path = Path(path)
        f = path / PROCESSOR_FILE
        if not f.is_file():
            raise CheckpointError(f"{path}: missing {PROCESSOR_FILE} (not a vlmlab checkpoint)")
        settings = json.loads(f.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = from_dict(ProcessorConfig, settings["config"], f"{f}: config")
        return cls(tokenizer, config, settings["num_image_tokens"])


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A processor batch with its tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model) -> torch.device:
    """The device of a model's parameters (the CPU for parameter-less stand-ins)."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if params else None
    return first.device if first is not None else torch.device("cpu")


def _to_json(cfg: ProcessorConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
