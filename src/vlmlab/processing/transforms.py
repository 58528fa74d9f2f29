"""Image -> normalised tensor: optional LLaVA-1.5 pad-to-square, resize, scale, normalise.

One function for training and inference (``Processor`` calls it on both paths), so a model sees in serving
exactly the pixels it saw in training.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmlab.config import ProcessorConfig
from vlmlab.registry import Registry


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: a max(W, H) square with the image centred on ``background``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def squash(image: Image.Image, side: int) -> Image.Image:
    """Resize to ``side`` x ``side`` (bicubic), whatever the aspect ratio."""
    if image.size == (side, side):
        return image
    return image.resize((side, side), Image.Resampling.BICUBIC)


def shortest_edge_crop(image: Image.Image, side: int) -> Image.Image:
    """CLIP's preprocessing: the shorter side to ``side`` (bicubic, the longer one truncated to an int as
    transformers' ``get_resize_output_image_size`` does), then the centre ``side`` x ``side`` crop."""
    w, h = image.size
    if (w, h) != (side, side):
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        if size != (w, h):
            image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)) if (w, h) != (side, side) else image


RESIZERS = Registry("resize mode")
RESIZERS["squash"] = squash
RESIZERS["shortest_edge_crop"] = shortest_edge_crop


def image_to_tensor(image: Image.Image, cfg: ProcessorConfig) -> torch.Tensor:
    """RGB PIL image -> ``[3, S, S]`` float tensor normalised with ``cfg.image_mean`` / ``cfg.image_std``."""
    if cfg.pad_to_square:
        # LLaVA-1.5 pads with the mean colour in 0-255 units: tuple(int(x * 255) for x in image_mean).
        image = expand2square(image, tuple(int(x * 255) for x in cfg.image_mean))
    image = RESIZERS[cfg.resize](image, cfg.image_size)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return (x - mean) / std


def blank_image(cfg: ProcessorConfig) -> Image.Image:
    """The image used by the blind baseline: the mean colour everywhere (all zeros after normalisation)."""
    return Image.new("RGB", (cfg.image_size, cfg.image_size), tuple(round(x * 255) for x in cfg.image_mean))
