"""LLaVA-NeXT AnyRes (SYSTEMS.md §11): a base view plus tiles of the best-fitting grid resolution, and the
packing of their features into one row-major map with padding removed and a learned newline after each row.

Pure geometry first (resolution choice, grid, unpad box, token count), shared by the processor (how many
placeholder tokens an image gets) and the model (how many feature rows it produces), so the two always agree.
References: haotian-liu/LLaVA ``mm_utils.py`` / ``llava_arch.py``; transformers ``LlavaNextImageProcessor``,
``modeling_llava_next.py`` and ``modeling_llava_onevision.py`` (``anyres_max_N``). Sizes are ``(height, width)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from vlmlab.config import AnyResConfig


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` that keeps most of the image's pixels when the image is scaled to fit it; ties
    go to the least wasted area, and an exact tie to the first pinpoint (the comparison is strict)."""
    h, w = size
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        s = min(pw / w, ph / h)
        eff = min(int(w * s) * int(h * s), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def fit_size(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """The size of the image scaled to fit ``target`` with its aspect kept (ceil on the free side)."""
    h, w = size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def grid_shape(size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """Tiles ``(rows, cols)`` of the resolution chosen for an image of ``size``."""
    ph, pw = select_best_resolution(size, pinpoints)
    return ph // tile, pw // tile


def unpad_box(rows: int, cols: int, size: Sequence[int]) -> tuple[int, int, int, int]:
    """``(top, height, left, width)`` of the feature map ``rows x cols`` that shows the image, not the padding.

    The image was scaled to fit and centred, so the padding is on the short side; transformers' rounding
    (``int(round(x, 7))``) is kept so the counts match its checkpoints exactly."""
    h, w = size
    if w / h > cols / rows:  # wider than the grid: padding above and below
        new = int(round(h * (cols / w), 7))
        pad = (rows - new) // 2
        return pad, rows - 2 * pad, 0, cols
    new = int(round(w * (rows / h), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - 2 * pad


def shrunk_shape(rows: int, cols: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """OneVision ``anyres_max_N``: a map over 1.1x the area of N tiles is scaled down (bilinear) to about that."""
    if max_tiles is None:
        return rows, cols
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def num_tokens(size: Sequence[int], cfg: AnyResConfig, tile: int, side: int, tiled: bool = True) -> int:
    """Feature rows the model produces for an image of ``size``: base view, then the (unpadded, shrunk) tile
    map with a newline per row; an untiled image is its one view (plus one newline)."""
    base = side * side
    if not tiled:
        return base + int(cfg.newline)
    gh, gw = grid_shape(size, cfg.grid_pinpoints, tile)
    rows, cols = gh * side, gw * side
    if cfg.unpad:
        _, rows, _, cols = unpad_box(rows, cols, size)
    rows, cols = shrunk_shape(rows, cols, side, cfg.max_tiles)
    return base + rows * (cols + int(cfg.newline))


# -- images -> views -----------------------------------------------------------------------------------------
def tile_views(image: Image.Image, pinpoints: Sequence[Sequence[int]], tile: int) -> list[Image.Image]:
    """``[base] + tiles``: the base view is the whole image squashed to ``tile``; the tiles are the image scaled
    to fit the chosen resolution (bicubic), centred on black, cut row-major into ``tile`` squares."""
    size = (image.height, image.width)
    target = select_best_resolution(size, pinpoints)
    nh, nw = fit_size(size, target)
    resized = image if (nh, nw) == size else image.resize((nw, nh), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target[1], target[0]), (0, 0, 0))
    canvas.paste(resized, ((target[1] - nw) // 2, (target[0] - nh) // 2))
    tiles = [
        canvas.crop((x, y, x + tile, y + tile))
        for y in range(0, target[0], tile)
        for x in range(0, target[1], tile)
    ]
    base = image if image.size == (tile, tile) else image.resize((tile, tile), Image.Resampling.BICUBIC)
    return [base, *tiles]


# -- features -> one sequence -----------------------------------------------------------------------------------
def pack_features(
    feats: torch.Tensor,  # [P, side * side, D]: the base view, then the tiles row-major
    size: Sequence[int],
    cfg: AnyResConfig,
    tile: int,
    newline: torch.Tensor | None,  # [D]
) -> torch.Tensor:
    """``[N_tok, D]``: base rows, then the tile map row by row (unpadded, shrunk), each row ended by ``newline``."""
    side = math.isqrt(feats.shape[1])
    base = feats[0]
    if feats.shape[0] == 1:  # an untiled view
        return base if newline is None else torch.cat([base, newline[None].to(base)])
    gh, gw = grid_shape(size, cfg.grid_pinpoints, tile)
    d = feats.shape[-1]
    # [gh*gw, s*s, D] -> [gh, gw, s, s, D] -> [gh, s, gw, s, D] -> one [gh*s, gw*s, D] map.
    grid = feats[1:].view(gh, gw, side, side, d).permute(0, 2, 1, 3, 4).reshape(gh * side, gw * side, d)
    if cfg.unpad:
        top, rows, left, cols = unpad_box(gh * side, gw * side, size)
        grid = grid[top : top + rows, left : left + cols]
    rows, cols = shrunk_shape(grid.shape[0], grid.shape[1], side, cfg.max_tiles)
    if (rows, cols) != grid.shape[:2]:
        grid = torch.nn.functional.interpolate(
            grid.permute(2, 0, 1)[None], size=[rows, cols], mode="bilinear"
        )[0].permute(1, 2, 0)
    if newline is not None:
        grid = torch.cat([grid, newline.to(grid).expand(grid.shape[0], 1, d)], dim=1)
    return torch.cat([base, grid.reshape(-1, d)])
