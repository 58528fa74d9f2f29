"""A small ConvNet tower trained from scratch: the embedded default's vision encoder.

Why a ConvNet and not a ViT for the ``tiny`` preset: on a 2-core CPU a from-scratch ViT learns colour late and
shape not at all within minutes (measured in issue 2: 0 points on shape after 8 minutes), because nothing in its
architecture is local. Convolutions give locality and translation equivariance for free, so shape features emerge
in the first few thousand samples. The pattern follows Mini-Gemini / Cambrian's use of ConvNets as towers.

``[B, 3, H, W] -> [B, (H/2^S/P) * (W/2^S/P), D]``: S stride-2 stages, then an average pool of P x P cells, so the
number of visual tokens is a setting (fewer tokens = faster training).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(8 if c % 8 == 0 else 1, c)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"vision.params.norm: {kind!r} is not one of ['batch', 'group', 'none']")


def _stage(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=norm == "none"),
        _norm(norm, c_out),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=norm == "none"),
        _norm(norm, c_out),
        nn.GELU(),
    )


class ConvNetTower(nn.Module):
    """params: ``channels`` (one entry per stride-2 stage), ``pool`` (final average-pool size)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        channels = list(config.params.get("channels", (32, 64, 128)))
        self.pool = int(config.params.get("pool", 2))
        norm = config.params.get("norm", "group")
        stages, c_in = [], 3
        for c in channels:
            stages.append(_stage(c_in, c, norm))
            c_in = c
        self.stages = nn.Sequential(*stages)
        # A global token (the mean feature over the whole map) first: a fixed place to read whole-image
        # attributes (colour, shape of a single object) from, next to the spatial tokens.
        self.global_token = bool(config.params.get("global_token", False))
        self.hidden_size = c_in
        side = config.image_size // (2 ** len(channels)) // self.pool
        self.num_tokens = side * side + int(self.global_token)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stages(pixel_values)  # [B, D, H', W']
        g = x.mean(dim=(2, 3))[:, None]  # [B, 1, D]
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        tokens = x.flatten(2).transpose(1, 2)  # [B, H'W', D], row-major
        if self.global_token:
            tokens = torch.cat([g, tokens], dim=1)
        return tokens
