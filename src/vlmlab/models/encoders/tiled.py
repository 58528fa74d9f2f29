"""A tower run on ``grid x grid`` tiles of its image, plus the whole image: Mini-Gemini-HD's low-resolution branch
(SYSTEMS.md §16; dvlab-research/MGM ``mgm/train/train.py`` ``_sample_item`` and ``mgm/serve/cli.py``: the image
at ``grid x 336`` is cut into ``grid^2`` tiles of 336, row-major, and with ``image_global`` the same image resized
to 336, bilinear, is appended).

``VisionConfig(name="tiled", image_size=grid * s, params={"tower": NAME, "grid": g, "global_view": True,
**NAME's params})``: the inner tower ``NAME`` is built at ``s = image_size / grid`` with the rest of the config
(``select_layer``, ``pretrained`` ...). ``[B, 3, g*s, g*s] -> [B, V * n, D]``, ``V = g^2 (+ 1)`` views of ``n``
rows each: the tiles row-major, then the whole image.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError


class TiledTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        from vlmlab.models.encoders import ENCODERS  # the registry imports this module

        params = dict(config.params)
        if "tower" not in params:
            raise ConfigError("vision.params.tower: the tiled tower needs the name of the tower it runs")
        self.tower_name = params.pop("tower")
        self.grid = int(params.pop("grid", 2))
        self.global_view = bool(params.pop("global_view", True))
        if self.grid < 1 or config.image_size % self.grid:
            raise ConfigError(
                f"vision.params.grid: {self.grid} must be >= 1 and divide the image size {config.image_size}"
            )
        self.tile_size = config.image_size // self.grid
        inner = dataclasses.replace(config, name=self.tower_name, image_size=self.tile_size, params=params)
        self.tower = ENCODERS[self.tower_name](inner)
        self.inner_params = params
        self.views = self.grid**2 + int(self.global_view)
        self.hidden_size = self.tower.hidden_size
        self.num_tokens = self.views * self.tower.num_tokens

    def architecture_params(self) -> dict:
        inner = (
            self.tower.architecture_params()
            if hasattr(self.tower, "architecture_params")
            else self.inner_params
        )
        return {"tower": self.tower_name, "grid": self.grid, "global_view": self.global_view, **inner}

    def views_of(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, g*s, g*s] -> [B * V, 3, s, s]``: each image's tiles (row-major), then the image resized."""
        b, c, g, s = pixel_values.shape[0], pixel_values.shape[1], self.grid, self.tile_size
        tiles = pixel_values.reshape(b, c, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, s, s)
        if self.global_view:
            whole = F.interpolate(pixel_values, size=(s, s), mode="bilinear", align_corners=False)
            tiles = torch.cat([tiles, whole[:, None]], dim=1)
        return tiles.flatten(0, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.tower(self.views_of(pixel_values))  # [B * V, n, D]
        return feats.unflatten(0, (-1, self.views)).flatten(1, 2)
