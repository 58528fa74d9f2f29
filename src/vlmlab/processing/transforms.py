"""Image -> normalised tensor: optional LLaVA-1.5 pad-to-square, resize, scale, normalise.

One function for training and inference (``Processor`` calls it on both paths), so a model sees in serving
exactly the pixels it saw in training.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

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
    mean, std = tuple(cfg.image_mean), tuple(cfg.image_std)
    pixels = np.asarray(image)  # [S, S, 3]
    if pixels.dtype != np.uint8:
        return _normalise(torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1), mean, std)
    # An 8-bit channel has 256 possible values: look each one up in a table computed with the very same float
    # operations (so the same bits) instead of converting, scaling and normalising every pixel.
    table = _normalised_levels(mean, std)  # [3, 256]
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[c])
    return torch.from_numpy(out)


def images_to_tensor(
    images: list[Image.Image], cfg: ProcessorConfig, threads: int | None = None
) -> torch.Tensor:
    """``[N, 3, S, S]``: ``image_to_tensor`` of each image, on ``threads`` threads (default: torch's thread count).

    Pillow releases the GIL while it resizes, which is most of the work, so a batch scales with the cores."""
    threads = min(len(images), threads or torch.get_num_threads())
    if threads <= 1:
        tensors = [image_to_tensor(im, cfg) for im in images]
    else:
        with ThreadPoolExecutor(threads) as pool:
            tensors = list(pool.map(image_to_tensor, images, [cfg] * len(images)))
    # numpy's stack: a plain copy, no torch thread pool to wake (and wait for) for a few megabytes.
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[3, ...]`` 0-255 values -> scaled to [0, 1], minus the mean, over the std (transformers' order of ops)."""
    shape = (3,) + (1,) * (x.dim() - 1)
    return (x / 255.0 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@functools.lru_cache(maxsize=8)
def _normalised_levels(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, 256]``: the normalised value of every 8-bit level of each channel."""
    levels = torch.arange(256, dtype=torch.float32).expand(3, 256)
    return _normalise(levels, mean, std).numpy()


def blank_image(cfg: ProcessorConfig, size: tuple[int, int] | None = None) -> Image.Image:
    """The image used by the blind baseline: the mean colour everywhere (all zeros after normalisation), of
    ``size`` (width, height; default ``image_size`` squared). Given the real image's size, a tiling or
    any-resolution model (AnyRes, Fuyu, HD) sees as many views and tokens as with the real image."""
    side = (cfg.image_size, cfg.image_size)
    return Image.new("RGB", size or side, tuple(round(x * 255) for x in cfg.image_mean))
