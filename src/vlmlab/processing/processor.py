"""The one preprocessing path shared by training, evaluation, chat and serving.

conversation + images -> chat template -> token ids with each ``<image>`` expanded to exactly the number of
visual tokens the model produces -> labels (-100 everywhere except assistant replies and their end token) ->
truncation that never cuts through an image -> padded batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlmlab.config import ProcessorConfig, from_dict
from vlmlab.errors import CheckpointError, SampleError
from vlmlab.models import video as video_tokens
from vlmlab.models.tiling import TILERS, anyres
from vlmlab.models.vlm import EXTRA_VISUAL_INPUTS
from vlmlab.processing.chat import render_with_spans
from vlmlab.processing.image import load_image, to_rgb
from vlmlab.processing.image_labels import label_images
from vlmlab.processing.transforms import image_to_tensor, images_to_tensor

IGNORE_INDEX = -100
PROCESSOR_FILE = "processor.json"


class Processor:
    def __init__(self, tokenizer, config: ProcessorConfig, num_image_tokens: int, qformer_tokenizer=None):
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        """InstructBLIP's Q-Former tokenizer (``config.qformer_instruction``); None: the model's own tokenizer."""
        self.config = config
        self.num_image_tokens = num_image_tokens
        """Tokens of one view (an image without AnyRes, a tile, a video frame before pooling)."""
        self.image_token_id = self._special_id(config.image_token)
        self.video_token_id = self._special_id(config.video.token) if config.video is not None else None
        self.grid_side = math.isqrt(num_image_tokens)
        self.tiler = TILERS[config.tiler](**config.tiler_params) if config.tiler else None
        if self.tiler is not None and config.anyres is not None:
            raise SampleError("processor: a tiler and AnyRes are two tilings; set one of them")
        self.gives_sizes = config.anyres is not None or hasattr(self.tiler, "packer")
        """Batches carry ``image_sizes``: AnyRes and packing tilers build each image's rows from its size."""
        self.image_start_ids = [self._special_id(t) for t in (config.image_start,) if t]
        self.image_end_ids = [self._special_id(t) for t in (config.image_end,) if t]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id

    def _special_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise SampleError(f"the tokenizer has no {token!r} token; add it as a special token")
        return tid

    # -- token counts (the model produces exactly these many feature rows) ---------------------------------
    def image_token_counts(self, images: Sequence[Image.Image]) -> list[int]:
        """Placeholder tokens per image: fixed, or with AnyRes from each image's size (and OneVision's rule
        that images sharing a sample are not tiled)."""
        return image_token_counts(
            self.config, self.num_image_tokens, [(im.height, im.width) for im in images], self.tiler
        )

    def image_token_layouts(self, images: Sequence[Image.Image]) -> list[list[int]] | None:
        """Each image's token ids when the tiler writes text between its views (``token_ids``), else None."""
        if self.tiler is None or not hasattr(self.tiler, "token_ids"):
            return None
        side, n = self.config.image_size, self.num_image_tokens
        return [
            self.tiler.token_ids((im.height, im.width), side, n, self.image_token_id, self.tokenizer)
            for im in images
        ]

    def video_token_counts(self, videos: Sequence[Sequence[Image.Image]]) -> list[int]:
        if videos and self.config.video.as_images:
            raise SampleError("videos are image lists for this model: call videos_as_images first")
        return [video_tokens.num_tokens(len(v), self.config.video, self.grid_side) for v in videos]

    # -- single samples ------------------------------------------------------------------------------------
    def load_images(self, sources: Sequence[str | os.PathLike | bytes | Image.Image]) -> list[Image.Image]:
        return [
            to_rgb(s)
            if isinstance(s, Image.Image)
            else load_image(s, max_pixels=self.config.max_image_pixels)
            for s in sources
        ]

    def load_videos(self, sources: Sequence) -> list[list[Image.Image]]:
        """Each video as its sampled frames: a file (decoded with PyAV), or frames given as PIL images or a
        ``[F, H, W, 3]`` uint8 array (used as they are)."""
        cfg = self.config.video
        if sources and cfg is None:
            raise SampleError("this model takes no videos (its processor has no video settings)")
        out = []
        for s in sources:
            if isinstance(s, (str, os.PathLike)):
                from vlmlab.processing.video import load_video

                frames = load_video(
                    s, cfg.num_frames, max_frames=cfg.max_frames, max_pixels=self.config.max_image_pixels
                )
            else:
                frames = [
                    to_rgb(f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f))) for f in s
                ]
            if not 1 <= len(frames) <= cfg.max_frames:
                raise SampleError(
                    f"a video has {len(frames)} frames; 1 to max_frames={cfg.max_frames} allowed"
                )
            out.append(frames)
        return out

    def encode(
        self,
        messages: list[dict],
        images: Sequence[str | os.PathLike | bytes | Image.Image] = (),
        videos: Sequence = (),
        *,
        add_generation_prompt: bool = False,
        train: bool = False,
        truncate: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """One sample: ``input_ids`` [T], ``labels`` [T] and the visual tensors of ``encode_visuals``.
        ``truncate=False`` keeps samples longer than ``max_length`` whole (a server checks them itself).

        Raises ``SampleError`` / ``ImageError`` (one line) when the sample cannot be used as it is."""
        messages, ims, vids = self.load_sample(messages, images, videos)
        out = self.encode_text(
            messages,
            self.image_token_counts(ims),
            add_generation_prompt=add_generation_prompt,
            train=train,
            video_tokens=self.video_token_counts(vids),
            truncate=truncate,
            image_layouts=self.image_token_layouts(ims),
        )
        out = {**out, **self.encode_visuals(ims, vids)}
        if self.config.qformer_instruction and ims:
            out["qformer_input_ids"] = self.instruction_ids(messages).expand(len(ims), -1)
        return out

    def instruction_ids(self, messages: list[dict]) -> torch.Tensor:
        """InstructBLIP's Q-Former input: the user turns' text without image placeholders, ``[L]``."""
        text = "\n".join(
            m["content"].replace(self.config.image_token, "").strip()
            for m in messages
            if m.get("role") == "user" and isinstance(m.get("content"), str)
        )
        tok = self.qformer_tokenizer or self.tokenizer
        ids = tok(text, truncation=True, max_length=self.config.qformer_max_length)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)[None]

    def load_sample(
        self, messages: list[dict], images: Sequence = (), videos: Sequence = ()
    ) -> tuple[list[dict], list[Image.Image], list[list[Image.Image]]]:
        """Images and videos decoded; for a model that takes videos as image lists, the frames moved into the
        images and the messages rewritten to match (``videos_as_images``)."""
        ims, vids = self.load_images(images), self.load_videos(videos)
        if vids and self.config.video.as_images:
            messages, ims = self.videos_as_images(messages, ims, vids)
            vids = []
        return messages, ims, vids

    def videos_as_images(
        self, messages: list[dict], images: list[Image.Image], videos: list[list[Image.Image]]
    ) -> tuple[list[dict], list[Image.Image]]:
        """Each ``<video>`` replaced by one ``<image>`` per frame, and the frames put into the image list where the
        video stands among the images (interleaved image lists, LLaVA-NeXT-Interleave)."""
        image_ph, video_ph = self.config.image_token, self.config.video.token
        ims, vids, out_images, out = iter(images), iter(videos), [], []
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str):
                out.append(m)
                continue
            parts = []
            for i, piece in enumerate(content.split(video_ph)):
                if i:  # a video stood before this piece
                    frames = next(vids, None)
                    if frames is None:
                        raise SampleError(f"more {video_ph} placeholders than videos ({len(videos)})")
                    out_images += frames
                    parts.append(image_ph * len(frames))
                out_images += [im for im in (next(ims, None) for _ in range(piece.count(image_ph))) if im]
                parts.append(piece)
            out.append({**m, "content": "".join(parts)})
        if next(vids, None) is not None:
            raise SampleError(f"more videos ({len(videos)}) than {video_ph} placeholders")
        # Images without a placeholder stay in the list: the count check then names the mismatch.
        return out, out_images + list(ims)

    def encode_visuals(
        self, images: Sequence[Image.Image], videos: Sequence[Sequence[Image.Image]] = ()
    ) -> dict[str, torch.Tensor | None]:
        """``pixel_values``: ``[N_img, 3, S, S]``, or with AnyRes ``[N_img, P, 3, S, S]`` (each image's base view
        and tiles, zero-padded to the most views) plus ``image_sizes`` ``[N_img, 2]`` (height, width), or with a
        tiler every image's views ``[sum P, 3, S, S]`` (plus ``image_sizes`` for a packing tiler);
        ``pixel_values_videos``: ``[N_vid, F, 3, S, S]``. Absent inputs are None."""
        cfg = self.config
        out: dict[str, torch.Tensor | None] = {"pixel_values": None}
        if self.gives_sizes:
            out["image_sizes"] = None
        if images and self.tiler is not None:
            # Views are already S x S: a squash to S leaves them as they are.
            as_is = dataclasses.replace(cfg, pad_to_square=False, resize="squash")
            views = [v for im in images for v in self.tiler.views(im, cfg.image_size)]
            out["pixel_values"] = torch.stack([image_to_tensor(v, as_is) for v in views])
            if self.gives_sizes:  # a packing tiler
                out["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        elif images and cfg.anyres is None:
            out["pixel_values"] = images_to_tensor(list(images), cfg)
        elif images:
            tiled = cfg.anyres.tile_multi_image or len(images) == 1
            # Views are already S x S (a squash to S leaves them as they are); an untiled image is padded to a
            # square with the mean colour, then squashed (OneVision).
            as_is = dataclasses.replace(cfg, pad_to_square=not tiled, resize="squash")
            views = [
                [
                    image_to_tensor(v, as_is)
                    for v in (
                        anyres.tile_views(im, cfg.anyres.grid_pinpoints, cfg.image_size) if tiled else [im]
                    )
                ]
                for im in images
            ]
            out["pixel_values"] = pad_views([torch.stack(v) for v in views])
            out["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        if cfg.cross_image_size is not None:  # CogAgent: the high-resolution tower's view of each image
            hr = dataclasses.replace(
                cfg, image_size=cfg.cross_image_size, pad_to_square=False, resize="squash"
            )
            out["cross_pixel_values"] = images_to_tensor(list(images), hr) if images else None
        if cfg.video is not None:
            out["pixel_values_videos"] = (
                torch.stack([torch.stack([image_to_tensor(f, cfg) for f in v]) for v in videos])
                if videos
                else None
            )
        return out

    def encode_images(self, images: Sequence[str | os.PathLike | bytes | Image.Image]) -> torch.Tensor | None:
        """The ``pixel_values`` of ``encode_visuals`` (None when there are no images)."""
        return self.encode_visuals(self.load_images(images))["pixel_values"] if images else None

    def encode_text(
        self,
        messages: list[dict],
        image_tokens: int | Sequence[int],
        *,
        add_generation_prompt: bool = False,
        train: bool = False,
        video_tokens: Sequence[int] = (),
        truncate: bool = True,
        image_layouts: Sequence[list[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Token ids with each image (video) placeholder expanded to its token count, and the loss labels.

        ``image_tokens``: the token count of each image, in order (``image_token_counts``), or the number of
        images when every image has ``num_image_tokens`` (no AnyRes). ``image_layouts``: each image's token ids
        when a tiler writes text between its views (``image_token_layouts``). Every image's run is wrapped in
        ``image_start`` / ``image_end`` when the processor has them."""
        if isinstance(image_tokens, int):
            if self.config.anyres is not None:
                raise SampleError("with AnyRes the image token counts depend on the image sizes; pass them")
            image_tokens = [self.num_image_tokens] * image_tokens
        expand = {self.image_token_id: list(image_tokens)}
        placeholders = [(self.config.image_token, len(image_tokens), "image")]
        if self.config.video is not None:
            expand[self.video_token_id] = list(video_tokens)
            placeholders.append((self.config.video.token, len(video_tokens), "video"))
        elif video_tokens:
            raise SampleError("this model takes no videos (its processor has no video settings)")
        for placeholder, n, what in placeholders:
            n_placeholders = sum(
                m["content"].count(placeholder) for m in messages if isinstance(m.get("content"), str)
            )
            if n_placeholders != n:
                raise SampleError(
                    f"{n_placeholders} {placeholder} placeholder(s) in the conversation but {n} {what}(s)"
                )
        if self.config.image_label:  # Qwen-VL: "Picture k: " before the k-th image
            messages = label_images(messages, self.config.image_token, self.config.image_label)
        text, spans = render_with_spans(self.tokenizer, messages, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        counts = {tid: iter(c) for tid, c in expand.items()}
        layouts = iter(image_layouts) if image_layouts is not None else None
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tok in counts:
                n = next(counts[tok])
                run = [tok] * n
                if tok == self.image_token_id:
                    layout = next(layouts) if layouts is not None else None
                    run = self.image_start_ids + (run if layout is None else layout) + self.image_end_ids
                ids += run
                labels += [IGNORE_INDEX] * len(run)
                continue
            in_reply = any(s <= start and end <= e and start < e for s, e in spans)
            ids.append(tok)
            labels.append(tok if in_reply else IGNORE_INDEX)
        if truncate:
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
        # Any image (video) token at or beyond the cut means an image would be cut through or dropped.
        visual = {self.image_token_id, self.video_token_id}
        if any(t in visual for t in ids[limit:]):
            raise SampleError(
                f"sample is {len(ids)} tokens, over max_length {limit}, and truncating it would cut through an image"
            )
        return ids[:limit], labels[:limit]

    # -- batches -------------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[dict], padding_side: str = "right") -> dict[str, torch.Tensor | None]:
        """Pad to the longest sample; images (videos) of all samples are concatenated in order."""
        if any("rejected_input_ids" in s for s in samples):  # DPO pairs: chosen rows, then rejected rows
            from vlmlab.data.preference import collate_pairs

            return collate_pairs(self, samples, padding_side)
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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pix = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        batch["pixel_values"] = (pad_views(pix) if pix[0].dim() == 5 else torch.cat(pix)) if pix else None
        if self.gives_sizes:
            sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
            batch["image_sizes"] = torch.cat(sizes) if sizes else None
            if self.config.anyres is not None and not self.config.anyres.tile_multi_image:
                # OneVision: images per sample (samples without images left out, as transformers does).
                counts = [len(s["image_sizes"]) for s in samples if s.get("image_sizes") is not None]
                batch["batch_num_images"] = torch.tensor(counts) if counts else None
        if self.config.cross_image_size is not None:
            hr = [s["cross_pixel_values"] for s in samples if s.get("cross_pixel_values") is not None]
            batch["cross_pixel_values"] = torch.cat(hr) if hr else None
        rows = [s["qformer_input_ids"] for s in samples if s.get("qformer_input_ids") is not None]
        if rows:  # one instruction row per image, right-padded
            tok = self.qformer_tokenizer or self.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            ids = torch.full(
                (sum(len(r) for r in rows), max(r.shape[1] for r in rows)), pad, dtype=torch.long
            )
            mask = torch.zeros_like(ids)
            at = 0
            for r in rows:
                ids[at : at + len(r), : r.shape[1]] = r
                mask[at : at + len(r), : r.shape[1]] = 1
                at += len(r)
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = ids, mask
        if self.config.video is not None:
            vids = [s["pixel_values_videos"] for s in samples if s.get("pixel_values_videos") is not None]
            if vids and len({v.shape[1] for v in vids}) > 1:
                raise SampleError(
                    f"videos in one batch must have the same frame count, got {[v.shape[1] for v in vids]}"
                )
            batch["pixel_values_videos"] = torch.cat(vids) if vids else None
        return batch

    def __call__(
        self,
        conversations: Sequence[list[dict]],
        images: Sequence[Sequence] | None = None,
        add_generation_prompt: bool = True,
        videos: Sequence[Sequence] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """A left-padded generation batch (the inference path; training calls ``encode`` + ``collate``)."""
        images = images if images is not None else [()] * len(conversations)
        videos = videos if videos is not None else [()] * len(conversations)
        samples = [
            self.encode(c, im, v, add_generation_prompt=add_generation_prompt)
            for c, im, v in zip(conversations, images, videos)
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
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(path / QFORMER_TOKENIZER))
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
        return cls(tokenizer, config, settings["num_image_tokens"], load_qformer_tokenizer(path))


QFORMER_TOKENIZER = "qformer_tokenizer"  # the subfolder transformers' InstructBlipProcessor writes


def load_qformer_tokenizer(path: Path):
    """The Q-Former's own tokenizer saved beside a model (InstructBLIP), or None."""
    sub = Path(path) / QFORMER_TOKENIZER
    return AutoTokenizer.from_pretrained(str(sub)) if sub.is_dir() else None


def image_token_counts(
    config: ProcessorConfig, tokens_per_view: int, sizes: Sequence[tuple[int, int]], tiler=None
) -> list[int]:
    """Feature rows (placeholder tokens) of each image of one sample, from the ``(height, width)`` sizes alone:
    ``tokens_per_view`` each without tiling; views x tokens with a tiler (or the tiler's ``num_tokens``); AnyRes'
    count (with OneVision's rule that images sharing a sample are not tiled)."""
    if config.tiler is not None:
        tiler = tiler or TILERS[config.tiler](**config.tiler_params)
        if hasattr(tiler, "num_tokens"):
            return [tiler.num_tokens(s, config.image_size, tokens_per_view) for s in sizes]
        return [tiler.num_views(s, config.image_size) * tokens_per_view for s in sizes]
    cfg = config.anyres
    if cfg is None:
        return [tokens_per_view] * len(sizes)
    tiled = cfg.tile_multi_image or len(sizes) == 1
    side = math.isqrt(tokens_per_view)
    return [anyres.num_tokens(s, cfg, config.image_size, side, tiled) for s in sizes]


def pad_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N_i, P_i, 3, S, S]`` (or ``[P_i, 3, S, S]``) blocks -> one ``[sum N_i, P_max, 3, S, S]``, zero-padded
    along the views as transformers' AnyRes processors do."""
    views = [v if v.dim() == 5 else v[None] for v in views]
    p = max(v.shape[1] for v in views)
    return torch.cat([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 0, 0, p - v.shape[1])) for v in views])


# The model inputs besides the text that a batch may hold (all optional).
VISUAL_KEYS = (
    "pixel_values",
    "image_sizes",
    "pixel_values_videos",
    "batch_num_images",
    *EXTRA_VISUAL_INPUTS,
)


def visual_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The visual model inputs present in ``batch``."""
    return {k: batch[k] for k in VISUAL_KEYS if batch.get(k) is not None}


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
