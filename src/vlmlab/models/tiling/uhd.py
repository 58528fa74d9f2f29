"""LLaVA-UHD slicing as MiniCPM-V 2.0 does it (SYSTEMS.md §19; OpenBMB/MiniCPM-V ``finetune/dataset.py``
``slice_image``, ``find_best_resize``, ``get_refine_size``, ``split_to_patches``, ``get_grid_placeholder``).

An image of ``W x H`` becomes a **source** view (the whole image resized to about ``S^2`` pixels, aspect kept,
sides multiples of the patch) and, when it is larger than about one ``S^2``, a ``cols x rows`` grid of
**slices** cut from a **refine** image resized so that each slice is about ``S^2``:

- ``multiple = min(ceil(W * H / S^2), max_slices)``; ``multiple <= 1``: the source alone (upscaling allowed);
- otherwise the slice counts ``{m - 1, m, m + 1}`` without 1 and above ``max_slices``, every factor pair
  ``(cols, rows)`` of each, and the pair minimising ``|log(W / H) - log(cols / rows)|`` (the first one wins ties).

Sizes here are ``(width, height)`` and grids ``(cols, rows)``, as PIL and MiniCPM-V's code write them; the
``TILERS`` contract's ``num_views`` / ``token_ids`` take ``(height, width)`` like every vlmlab tiler.

In the model path each view (source, then the slices row-major) is resized to the tower's square ``side``:
vlmlab's towers take square views. The resampler itself accepts any grid (``minicpm_resampler`` with
``tgt_size=(h, w)``), so the native aspect-kept views can be encoded by a tower that takes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from PIL import Image


class Slicing(NamedTuple):
    """Where an image's views come from: ``grid`` ``(cols, rows)`` (None: no slices), ``source`` and ``refine``
    ``(width, height)`` in pixels (``refine`` None without slices)."""

    grid: tuple[int, int] | None
    source: tuple[int, int]
    refine: tuple[int, int] | None

    @property
    def num_views(self) -> int:
        return 1 + (self.grid[0] * self.grid[1] if self.grid else 0)


def ensure_divide(length: float, patch: int) -> int:
    """The nearest multiple of ``patch`` (Python's round: halves to even), at least ``patch``."""
    return max(round(length / patch) * patch, patch)


def best_resize(
    size: Sequence[float], scale: int, patch: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """``find_best_resize``: ``(w, h)`` of about ``scale^2`` pixels with the aspect kept (only when larger, or
    with ``allow_upscale``), each side then rounded to a multiple of ``patch``."""
    width, height = size
    if width * height > scale * scale or allow_upscale:
        r = width / height
        height = int(scale / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def refine_size(
    size: Sequence[int], grid: Sequence[int], scale: int, patch: int, allow_upscale: bool = True
) -> tuple[int, int]:
    """``get_refine_size``: the refine image's ``(w, h)``, so that each of the ``cols x rows`` slices is about
    ``scale^2`` with sides multiples of ``patch``."""
    width, height = size
    cols, rows = grid
    slice_w = ensure_divide(width, cols) / cols
    slice_h = ensure_divide(height, rows) / rows
    bw, bh = best_resize((slice_w, slice_h), scale, patch, allow_upscale=allow_upscale)
    return bw * cols, bh * rows


def slice_grid(
    size: Sequence[int],
    max_slices: int = 9,
    scale: int = 448,
    patch: int = 14,
    never_split: bool = False,
) -> Slicing:
    """The slicing of a ``(width, height)`` image (pure geometry, no pixels)."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1 or never_split:
        return Slicing(None, best_resize(size, scale, patch, allow_upscale=True), None)
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]
    candidates = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    best, best_err = (1, 1), math.inf
    for cols, rows in candidates:
        err = abs(log_ratio - math.log(cols / rows))
        if err < best_err:  # strict: the first grid with the minimum error wins
            best, best_err = (cols, rows), err
    return Slicing(best, best_resize(size, scale, patch), refine_size(size, best, scale, patch))


def slice_image(image: Image.Image, slicing: Slicing) -> tuple[Image.Image, list[Image.Image]]:
    """The source view and the slices (row-major) at their native sizes (bicubic resizes, as MiniCPM-V)."""
    source = image.resize(slicing.source, Image.Resampling.BICUBIC)
    if slicing.grid is None:
        return source, []
    refine = image.resize(slicing.refine, Image.Resampling.BICUBIC)
    cols, rows = slicing.grid
    sw, sh = slicing.refine[0] // cols, slicing.refine[1] // rows
    slices = [
        refine.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh)) for r in range(rows) for c in range(cols)
    ]
    return source, slices


class UHDTiler:
    """The ``uhd`` tiler: ``[source, *slices]`` views, each resized to ``side x side`` for vlmlab's square towers.

    ``scale`` (MiniCPM-V's ``scale_resolution``) and ``patch`` set the slicing; ``None`` uses the view side and
    14. ``token_ids`` writes MiniCPM-V's layout when the tokenizer has its tokens: each view's placeholders
    wrapped in ``view_start``/``view_end``, the source first, then the slices' rows joined by ``newline`` and
    the whole grid wrapped in ``slice_start``/``slice_end``; markers the tokenizer lacks are left out."""

    def __init__(
        self,
        max_slices: int = 9,
        scale: int | None = None,
        patch: int = 14,
        never_split: bool = False,
        view_start: str = "<im_start>",
        view_end: str = "<im_end>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        newline: str = "\n",
    ):
        self.max_slices, self.scale, self.patch, self.never_split = max_slices, scale, patch, never_split
        self.markers = (view_start, view_end, slice_start, slice_end)
        self.newline = newline

    def slicing(self, size_wh: Sequence[int], side: int) -> Slicing:
        return slice_grid(size_wh, self.max_slices, self.scale or side, self.patch, self.never_split)

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        source, slices = slice_image(image, self.slicing(image.size, side))
        return [v.resize((side, side), Image.Resampling.BICUBIC) for v in (source, *slices)]

    def num_views(self, size: Sequence[int], side: int) -> int:
        h, w = size
        return self.slicing((w, h), side).num_views

    def token_ids(
        self, size: Sequence[int], side: int, tokens_per_view: int, image_token_id: int, tokenizer
    ) -> list[int]:
        h, w = size
        grid = self.slicing((w, h), side).grid
        vs, ve, ss, se = (_token_id(tokenizer, t) for t in self.markers)
        nl = tokenizer.encode(self.newline, add_special_tokens=False) if self.newline else []

        def view() -> list[int]:
            return vs + [image_token_id] * tokens_per_view + ve

        ids = view()
        if grid is not None:
            cols, rows = grid
            lines = [[i for _ in range(cols) for i in view()] for _ in range(rows)]
            body = [i for r, line in enumerate(lines) for i in ((nl if r else []) + line)]
            ids += ss + body + se
        return ids


def _token_id(tokenizer, token: str | None) -> list[int]:
    """``[id]`` of a single token the tokenizer has, else ``[]``."""
    if not token:
        return []
    tid = tokenizer.convert_tokens_to_ids(token)
    return [] if tid is None or tid == tokenizer.unk_token_id else [tid]
