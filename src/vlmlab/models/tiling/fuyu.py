"""Fuyu's raster patching (tiler ``fuyu``, SYSTEMS.md §7), with transformers' token layout.

Reference: transformers ``models/fuyu/image_processing_fuyu.py`` (``FuyuImageProcessor``) and
``processing_fuyu.py`` (``FuyuProcessor._process_images``, ``replace_image_token``). An image of ``h x w``:

1. is resized (bilinear, aspect kept) only when larger than ``max_height x max_width``: the scale is
   ``min(max_height / h, max_width / w)`` and each side is truncated, ``int(h * scale)``;
2. is padded bottom/right with the 8-bit level ``pad_value`` (transformers' ``padding_value=1.0``, applied before
   rescaling) up to ``rows x cols`` patches, ``rows = ceil(h' / p)``, ``cols = ceil(w' / p)``: transformers pads to
   the whole ``max_height x max_width`` canvas, then crops to those patches, so the padding beyond them is never
   tokenised;
3. becomes its ``rows * cols`` patches, row-major: each patch is one ``p x p`` view (``p`` = the processor's
   ``image_size``) that the ``fuyu_patches`` tower flattens and the ``linear`` connector projects.

Layout: each row of patches is ``cols`` image placeholders then the ``newline`` text token (``|NEWLINE|``), which
keeps its word embedding: ``rows * (cols + 1)`` tokens per image, ``rows * cols`` of them feature rows.

Resizing uses Pillow's bilinear filter, as transformers' PIL backend (``FuyuImageProcessorPil``) does; its default
torchvision backend resizes with a slightly different antialiasing filter, so resized pixels can differ by a
level (the token counts and layout never do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from vlmlab.errors import ConfigError, SampleError

NEWLINE = "|NEWLINE|"


class FuyuTiler:
    """``max_height`` / ``max_width``: the largest image kept as it is (None: never resized); ``newline``: the
    row-end token; ``pad_value``: the 8-bit level of the padding (1, as transformers)."""

    def __init__(
        self,
        max_height: int | None = 1080,
        max_width: int | None = 1920,
        newline: str = NEWLINE,
        pad_value: int = 1,
    ):
        if (max_height is None) != (max_width is None):
            raise ConfigError("fuyu tiler: set both max_height and max_width, or neither")
        if not 0 <= pad_value <= 255:
            raise ConfigError(f"fuyu tiler: pad_value {pad_value} is not an 8-bit level (0-255)")
        self.max_height, self.max_width = max_height, max_width
        self.newline, self.pad_value = newline, pad_value

    def resized_size(self, size: Sequence[int]) -> tuple[int, int]:
        """``(height, width)`` after transformers' resize: unchanged when the image fits, else scaled down."""
        h, w = size
        if self.max_height is None or (h <= self.max_height and w <= self.max_width):
            return h, w
        scale = min(self.max_height / h, self.max_width / w)
        new = int(h * scale), int(w * scale)
        if min(new) < 1:
            raise SampleError(
                f"image of {h}x{w} pixels is too thin: it would be resized to {new[0]}x{new[1]}"
            )
        return new

    def grid(self, size: Sequence[int], side: int) -> tuple[int, int]:
        """``(rows, cols)`` of ``side``-px patches of an image of ``size`` ``(height, width)``."""
        # transformers crops its canvas to whole patches: an image filling a canvas that is not made of whole
        # patches fails there, so such a limit is refused for every image.
        if self.max_height is not None and (self.max_height % side or self.max_width % side):
            raise ConfigError(
                f"fuyu tiler: max size {self.max_height}x{self.max_width} is not a multiple of the {side}-px patch"
            )
        h, w = self.resized_size(size)
        return math.ceil(h / side), math.ceil(w / side)

    def num_views(self, size: Sequence[int], side: int) -> int:
        rows, cols = self.grid(size, side)
        return rows * cols

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        h, w = self.resized_size((image.height, image.width))
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        rows, cols = self.grid((h, w), side)
        canvas = Image.new("RGB", (cols * side, rows * side), (self.pad_value,) * 3)
        canvas.paste(image, (0, 0))
        return [
            canvas.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
            for r in range(rows)
            for c in range(cols)
        ]

    def token_ids(
        self, size: Sequence[int], side: int, tokens_per_view: int, image_token_id: int, tokenizer
    ) -> list[int]:
        rows, cols = self.grid(size, side)
        newline = tokenizer.convert_tokens_to_ids(self.newline)
        if newline is None or newline == tokenizer.unk_token_id:
            raise ConfigError(f"the tokenizer has no {self.newline!r} token (Fuyu's row end); add it")
        return ([image_token_id] * (cols * tokens_per_view) + [newline]) * rows
