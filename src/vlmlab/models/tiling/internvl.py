"""InternVL 1.5 dynamic tiling (SYSTEMS.md §18): an image -> the tiles of the grid whose aspect ratio is closest to
the image's, plus a thumbnail of the whole image when there is more than one tile.

- Candidate grids ``(i, j)`` (``i`` tiles across, ``j`` down) with ``min_tiles <= i * j <= max_tiles``, sorted by
  ``i * j`` (stable; within one area ``i`` ascending, transformers' ``get_all_supported_aspect_ratios`` order).
- The grid minimising ``|w / h - i / j|`` wins; on an exact tie a later (larger) grid wins when the image's area
  exceeds half the grid's pixel area (``w * h > 0.5 * side^2 * i * j``).
- The image is resized to ``(side * i, side * j)`` (width, height) **without** keeping its aspect ratio (bicubic)
  and cut into ``side``-square tiles row by row; a ``side``-square thumbnail of the whole image follows when
  ``i * j > 1`` (and ``thumbnail`` is on).

References: OpenGVLab/InternVL ``internvl_chat/internvl/train/dataset.py`` (``dynamic_preprocess``,
``find_closest_aspect_ratio``); transformers ``GotOcr2ImageProcessor(crop_to_patches=True)``
(``get_optimal_tiled_canvas``, ``crop_image_to_patches``), whose pixels these views reproduce exactly (PIL
backend). Sizes passed in are ``(height, width)``, as everywhere in vlmlab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from PIL import Image

from vlmlab.errors import ConfigError


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every ``(i, j)`` with ``min_tiles <= i * j <= max_tiles``, sorted by ``i * j`` (stable)."""
    grids = [
        (i, j)
        for i in range(1, max_tiles + 1)
        for j in range(1, max_tiles + 1)
        if min_tiles <= i * j <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def grid(size: Sequence[int], side: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """The grid ``(i, j)`` = (tiles across, tiles down) InternVL picks for an image of ``size`` = (height, width)."""
    h, w = size
    aspect, area = w / h, w * h
    best, best_diff = (1, 1), float("inf")
    for i, j in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * side * side * i * j:
            best = (i, j)
    return best


class DynamicTiler:
    """InternVL's ``dynamic_preprocess`` as a vlmlab tiler (``TILERS["dynamic"]``)."""

    def __init__(self, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True):
        if not 1 <= min_tiles <= max_tiles:
            raise ConfigError(
                f"dynamic tiler: need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}"
            )
        self.min_tiles, self.max_tiles, self.thumbnail = min_tiles, max_tiles, thumbnail

    def grid(self, size: Sequence[int], side: int) -> tuple[int, int]:
        return grid(size, side, self.min_tiles, self.max_tiles)

    def num_views(self, size: Sequence[int], side: int) -> int:
        i, j = self.grid(size, side)
        return i * j + int(self.thumbnail and i * j > 1)

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        i, j = self.grid((image.height, image.width), side)
        canvas = _resize(image, side * i, side * j)
        tiles = [
            canvas.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
            for r in range(j)
            for c in range(i)
        ]
        if self.thumbnail and len(tiles) > 1:
            tiles.append(_resize(image, side, side))
        return tiles


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BICUBIC)
