"""Several vision towers on one image (SYSTEMS.md §16, §20: Mini-Gemini's ViT + ConvNet, Cambrian-1's encoder mix).

``ModelConfig.extra_vision`` lists towers beside the primary one (``ModelConfig.vision``). The processor makes one
view per image at ``processor.image_size`` (the largest resolution any tower needs); each tower reads it resized to
its own ``image_size`` (bicubic, antialiased, as Mini-Gemini derives its low-resolution image from the
high-resolution one) and, when its ``image_mean`` / ``image_std`` differ from the processor's, re-normalised.
Each tower keeps its own feature selection (``select_layer``, ``select_feature``).

A connector that takes every tower's features (its class has ``multi_encoder = True``: Cambrian's SVA, Mini-Gemini's
patch info mining) gets the list ``[B, N_i, D_i]`` and ``in_dim`` the list of widths. Any other connector gets the
towers' features concatenated along channels, each tower's square grid resized (bilinear) to the primary's grid
(``concat_on_grid``: the "channel concatenation" baseline of Cambrian-1 and DeepSeek-VL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlmlab.config import ProcessorConfig, VisionConfig
from vlmlab.errors import ConfigError, SampleError


def tower_view(pixel_values: torch.Tensor, processor: ProcessorConfig, tower: VisionConfig) -> torch.Tensor:
    """``[N, 3, S, S]`` normalised by the processor -> ``[N, 3, s, s]`` at the tower's size and normalisation."""
    x = pixel_values
    if tower.image_size != x.shape[-1] or tower.image_size != x.shape[-2]:
        x = F.interpolate(x, size=(tower.image_size, tower.image_size), mode="bicubic", antialias=True)
    mean, std = tower.image_mean, tower.image_std
    if (mean is not None and tuple(mean) != tuple(processor.image_mean)) or (
        std is not None and tuple(std) != tuple(processor.image_std)
    ):
        shape = (1, 3, 1, 1)
        p_mean, p_std = (
            torch.tensor(v, dtype=x.dtype, device=x.device).view(shape)
            for v in (processor.image_mean, processor.image_std)
        )
        t_mean = torch.tensor(mean or processor.image_mean, dtype=x.dtype, device=x.device).view(shape)
        t_std = torch.tensor(std or processor.image_std, dtype=x.dtype, device=x.device).view(shape)
        x = (x * p_std + p_mean - t_mean) / t_std
    return x


def grid_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"{what}: {n} tokens are not a square grid (use select_feature='patch')")
    return side


def resize_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, n*n, D]`` -> ``[B, side*side, D]``: the square token grid resized bilinearly (antialiased when shrunk)."""
    b, n, d = x.shape
    s = grid_side(n, "resize_grid")
    if s == side:
        return x
    grid = x.transpose(1, 2).reshape(b, d, s, s)
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=side < s)
    return grid.flatten(2).transpose(1, 2)


def concat_on_grid(features: list[torch.Tensor]) -> torch.Tensor:
    """Every tower's features on the primary's grid, concatenated along channels: ``[B, N_0, sum D_i]``."""
    side = grid_side(features[0].shape[1], "the primary tower")
    if len({f.shape[0] for f in features}) != 1:
        raise SampleError(f"towers gave different batch sizes {[f.shape[0] for f in features]}")
    return torch.cat([features[0], *(resize_grid(f, side) for f in features[1:])], dim=-1)
