"""InternLM-XComposer2-4KHD's dynamic resolution (SYSTEMS.md §15): ``HD_transform``, the global-local views,
the 2 x 2 token merge and the learned separators (tiler ``hd``).

**Geometry** (``HD_transform`` of InternLM/InternLM-XComposer ``InternLM-XComposer-2.0/finetune/ixc_utils.py``),
for a tile side ``S`` (336) and a budget ``hd_num``:

- a portrait image (``w < h``) is transposed first, so ``ratio = w / h >= 1``;
- ``scale`` = the largest ``s`` with ``s * ceil(s / ratio) <= hd_num`` (counted up from 1);
- the image is resized (bilinear, PIL) to ``new_w = S * scale`` by ``new_h = int(new_w / ratio)``: small images are
  **upscaled** (336 x 336 with ``hd_num`` 9 becomes 1008 x 1008);
- its height is padded with **white** to ``ceil(new_h / S) * S``, ``int((pad) / 2)`` rows on top, the rest below;
- a transposed image is transposed back. Both sides are then multiples of ``S`` and ``rows * cols <= hd_num``.

**Views**: the global view (the padded image resized to ``S x S``, bicubic), then the ``rows x cols`` tiles of the
padded image, row-major.

**Features** (remote ``internlm/internlm-xcomposer2-4khd-7b`` ``build_mlp.py`` ``CLIPVisionTower.forward``): each
view's ``g x g`` token grid is merged 2 x 2 into ``(g/2)^2`` tokens of ``4C`` channels in ``(dy, dx, c)`` order
(``space_to_channel``); the tiles' grids are stitched into one ``(rows g/2) x (cols g/2)`` map; the learned
``sub_GN`` is appended after every row of the global map and of the stitched map, and the learned ``glb_GN``
separates them: ``[global (g/2) x (g/2 + 1)] [glb_GN] [local (rows g/2) x (cols g/2 + 1)]``, so an image is
``(rows * cols + 1) * (g/2)^2 + 1 + (rows + 1) * g/2`` rows (144 and 12 for CLIP-L/14-336), before the projector
(``vision_proj``, mlp2x_gelu 4C -> d) maps every row, separators included. ``HDPacker`` holds the two vectors
(the model's ``packer``, trained as its ``newline`` part; zero at init, as the reference's ``plora_sub_GN`` /
``plora_glb_GN``).

Differences from the reference: its global view is the *normalised* tensor resized by ``F.interpolate(bicubic)``;
here the same interpolation runs on the padded image's pixels, then is rounded to 8 bits (normalisation is affine,
so the two differ only by that rounding and by clipping the bicubic overshoot to 0-255). An image so flat that
``new_h`` rounds to 0 (the reference fails) is resized to one pixel row. Sizes passed in are ``(height, width)``,
as everywhere in vlmlab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors.pixel_shuffle import space_to_channel

WHITE = (255, 255, 255)


class HDLayout(NamedTuple):
    """Where ``HD_transform`` puts an image, in the *landscape* frame (after the transpose of a portrait image):
    the resized image ``(new_h, new_w)``, the padded canvas ``(height, width)`` and the top padding."""

    transposed: bool
    resized: tuple[int, int]
    padded: tuple[int, int]
    top: int


def hd_scale(ratio: float, hd_num: int) -> int:
    """The largest ``s`` with ``s * ceil(s / ratio) <= hd_num`` (``ratio = w / h >= 1``), counted as the reference
    counts: up from 1 until the product first exceeds the budget."""
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def hd_layout(size: Sequence[int], hd_num: int, tile: int) -> HDLayout:
    """``HD_transform``'s resize and padding of an image of ``size`` = (height, width)."""
    h, w = size
    transposed = w < h
    if transposed:
        h, w = w, h
    ratio = w / h
    new_w = int(hd_scale(ratio, hd_num) * tile)
    new_h = max(int(new_w / ratio), 1)
    padded_h = math.ceil(new_h / tile) * tile
    return HDLayout(transposed, (new_h, new_w), (padded_h, new_w), (padded_h - new_h) // 2)


def hd_grid(size: Sequence[int], hd_num: int, tile: int) -> tuple[int, int]:
    """Tiles ``(rows, cols)`` of the padded image, in the image's own orientation."""
    layout = hd_layout(size, hd_num, tile)
    rows, cols = layout.padded[0] // tile, layout.padded[1] // tile
    return (cols, rows) if layout.transposed else (rows, cols)


def merged_side(tokens_per_view: int, merge: int) -> int:
    """Side of one view's token grid after the ``merge x merge`` merge (12 for 24 x 24 CLIP-L/14-336 patches)."""
    g = math.isqrt(tokens_per_view)
    if g * g != tokens_per_view or g % merge:
        raise ConfigError(
            f"hd tiler: a view must be a square token grid whose side divides by {merge}, got {tokens_per_view} "
            f"tokens (a tower without CLS, or vision.select_feature='patch')"
        )
    return g // merge


def hd_num_tokens(size: Sequence[int], hd_num: int, tile: int, tokens_per_view: int, merge: int = 2) -> int:
    """Feature rows of an image: ``(rows * cols + 1) * m^2 + 1 + (rows + 1) * m`` with ``m`` the merged grid side
    (the reference's ``(h*w+1)*144 + 1 + (h+1)*12``)."""
    rows, cols = hd_grid(size, hd_num, tile)
    m = merged_side(tokens_per_view, merge)
    return (rows * cols + 1) * m * m + 1 + (rows + 1) * m


def hd_transform(image: Image.Image, hd_num: int, tile: int) -> Image.Image:
    """The padded image (both sides multiples of ``tile``), exactly as the reference builds it: transpose a
    portrait image, resize (PIL bilinear, what torchvision's ``resize`` does to a PIL image), pad the height with
    white, transpose back."""
    layout = hd_layout((image.height, image.width), hd_num, tile)
    if layout.transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    (new_h, new_w), (padded_h, _) = layout.resized, layout.padded
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (new_w, padded_h), WHITE)
    canvas.paste(resized, (0, layout.top))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if layout.transposed else canvas


def global_view(padded: Image.Image, side: int) -> Image.Image:
    """The padded image resized to ``side x side`` by torch's bicubic interpolation (no antialiasing, as the
    reference's ``F.interpolate(..., mode='bicubic')``), rounded to 8 bits."""
    x = torch.from_numpy(np.asarray(padded, dtype=np.float32)).permute(2, 0, 1)[None]
    y = nn.functional.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return Image.fromarray(y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


class HDTiler:
    """``HD_transform`` as a vlmlab tiler (``TILERS["hd"]``) that also packs its views' features (``packer``).

    ``hd_num``: the tile budget (the chat default is 25; 4KHD trains with up to 55). ``merge``: the token merge
    (2: 2 x 2 into the channels)."""

    def __init__(self, hd_num: int = 25, merge: int = 2):
        if not isinstance(hd_num, int) or hd_num < 1:
            raise ConfigError(f"hd tiler: hd_num must be a positive integer, got {hd_num!r}")
        if not isinstance(merge, int) or merge < 1:
            raise ConfigError(f"hd tiler: merge must be a positive integer, got {merge!r}")
        self.hd_num, self.merge = hd_num, merge

    def grid(self, size: Sequence[int], side: int) -> tuple[int, int]:
        return hd_grid(size, self.hd_num, side)

    def num_views(self, size: Sequence[int], side: int) -> int:
        rows, cols = self.grid(size, side)
        return 1 + rows * cols

    def num_tokens(self, size: Sequence[int], side: int, tokens_per_view: int) -> int:
        return hd_num_tokens(size, self.hd_num, side, tokens_per_view, self.merge)

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        """``[global] + tiles`` (row-major), each ``side x side``."""
        padded = hd_transform(image, self.hd_num, side)
        tiles = [
            padded.crop((x, y, x + side, y + side))
            for y in range(0, padded.height, side)
            for x in range(0, padded.width, side)
        ]
        return [global_view(padded, side), *tiles]

    def packer(self, dim: int, side: int) -> HDPacker:
        return HDPacker(self, dim, side)


class HDPacker(nn.Module):
    """Packs one image's view features into 4KHD's layout with the learned ``sub_gn`` (after every row) and
    ``glb_gn`` (between the global and the local maps), both ``[merge^2 * dim]`` and zero at init.

    ``forward(feats [1 + rows * cols, g * g, dim], size) -> [N_rows, merge^2 * dim]`` (``N_rows`` =
    ``HDTiler.num_tokens``)."""

    def __init__(self, tiler: HDTiler, dim: int, side: int):
        super().__init__()
        self.tiler, self.side, self.merge = tiler, side, tiler.merge
        self.out_dim = dim * tiler.merge**2
        self.sub_gn = nn.Parameter(torch.zeros(self.out_dim))
        self.glb_gn = nn.Parameter(torch.zeros(self.out_dim))

    def forward(self, feats: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        rows, cols = self.tiler.grid(size, self.side)
        if feats.dim() != 3 or feats.shape[0] != 1 + rows * cols:
            raise SampleError(
                f"hd tiler: an image of size {tuple(size)} has {1 + rows * cols} views, got features "
                f"{list(feats.shape)}"
            )
        m = merged_side(feats.shape[1], self.merge)
        x = space_to_channel(feats, self.merge)  # [P, m * m, D], channels (dy, dx, c)
        d = x.shape[-1]
        sub = self.sub_gn.to(x)
        glb = torch.cat([x[0].view(m, m, d), sub.expand(m, 1, d)], dim=1)
        # [rows * cols, m * m, D] -> [rows, cols, m, m, D] -> [rows, m, cols, m, D]: one (rows m) x (cols m) map.
        local = x[1:].view(rows, cols, m, m, d).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, d)
        local = torch.cat([local, sub.expand(rows * m, 1, d)], dim=1)
        return torch.cat([glb.reshape(-1, d), self.glb_gn.to(x)[None], local.reshape(-1, d)])
