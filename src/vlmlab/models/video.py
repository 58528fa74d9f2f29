"""Video frames -> tokens (LLaVA-NeXT-Video, OneVision; SYSTEMS.md §12): each frame is encoded as an image, its
token grid pooled in 2D, and ``image_newline`` placed per the ``newline`` option.

Shared by the processor (how many placeholder tokens a video gets) and the model (the rows it produces).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmlab.config import VideoConfig
from vlmlab.errors import ConfigError

POOLS = ("average", "max", "bilinear")
POOL_POSITIONS = ("before", "after")
NEWLINES = ("no_token", "grid", "frame", "one_token")


def check(cfg: VideoConfig) -> None:
    for name, value, valid in (
        ("pool", cfg.pool, POOLS),
        ("pool_position", cfg.pool_position, POOL_POSITIONS),
        ("newline", cfg.newline, NEWLINES),
    ):
        if value not in valid:
            raise ConfigError(f"processor.video.{name}: {value!r} is not one of {list(valid)}")
    if cfg.stride < 1 or not 1 <= cfg.num_frames <= cfg.max_frames:
        raise ConfigError(
            f"processor.video: need stride >= 1 and 1 <= num_frames ({cfg.num_frames}) <= max_frames "
            f"({cfg.max_frames})"
        )


def pooled_side(side: int, cfg: VideoConfig) -> int:
    """Side of a frame's token grid after pooling: floor for average/max pooling, ceil for bilinear."""
    return math.ceil(side / cfg.stride) if cfg.pool == "bilinear" else side // cfg.stride


def num_tokens(n_frames: int, cfg: VideoConfig, side: int) -> int:
    p = pooled_side(side, cfg)
    per_frame = {"grid": p * (p + 1), "frame": p * p + 1}.get(cfg.newline, p * p)
    return n_frames * per_frame + int(cfg.newline == "one_token")


def pool(feats: torch.Tensor, cfg: VideoConfig) -> torch.Tensor:
    """``[N, s*s, D] -> [N, p*p, D]``: 2D pooling of each frame's square token grid."""
    n, hw, d = feats.shape
    side = math.isqrt(hw)
    grid = feats.view(n, side, side, d).permute(0, 3, 1, 2)
    if cfg.pool == "bilinear":
        p = pooled_side(side, cfg)
        grid = nn.functional.interpolate(grid, size=[p, p], mode="bilinear")
    elif cfg.pool == "max":
        grid = nn.functional.max_pool2d(grid, cfg.stride, cfg.stride)
    else:
        grid = nn.functional.avg_pool2d(grid, cfg.stride, cfg.stride)
    return grid.flatten(2).transpose(1, 2)


def add_newlines(feats: torch.Tensor, cfg: VideoConfig, newline: torch.Tensor | None) -> torch.Tensor:
    """``[F, p*p, D]`` of one video -> ``[N_tok, D]`` with the newline vector where ``cfg.newline`` puts it."""
    f, pp, d = feats.shape
    if cfg.newline == "no_token" or newline is None:
        return feats.reshape(-1, d)
    nl = newline.to(feats)
    if cfg.newline == "grid":
        p = math.isqrt(pp)
        rows = feats.view(f, p, p, d)
        return torch.cat([rows, nl.expand(f, p, 1, d)], dim=2).reshape(-1, d)
    if cfg.newline == "frame":
        return torch.cat([feats, nl.expand(f, 1, d)], dim=1).reshape(-1, d)
    return torch.cat([feats.reshape(-1, d), nl[None]])  # one_token
