"""Idefics image splitting (tilers ``idefics2`` and ``idefics3``), with transformers' token layouts.

``idefics3`` (transformers ``Idefics3ImageProcessor`` + ``Idefics3Processor``): the image is resized so its longest
edge is ``longest_edge`` (default 4 tiles), then up to multiples of the tile side ``S``, and cut into rows x cols
S x S tiles (row-major) followed by the global image resized to S x S; an image that fits one tile (or with
``split=False``) is the global image alone. Layout: per tile ``<fake_token_around_image><row_i_col_j>`` + the tile's
placeholders, a ``\\n`` after each row, then ``\\n<fake_token_around_image><global-img>`` + placeholders +
``<fake_token_around_image>``; the text parts are tokenized by the tokenizer, as transformers does.

``idefics2`` (``Idefics2ImageProcessor`` + ``Idefics2Processor``): with ``split=True`` the four quadrants then the whole
image (5 views); layout ``<fake_token_around_image>`` + (placeholders + ``<fake_token_around_image>``) per view.

Views are S x S here (vlmlab's tiler contract), while transformers keeps Idefics2's views at their own sizes and
pads them: the token ids are the same, the pixels are not. (transformers also merges the ``<fake_token_around_image>``
of two images written back to back into one; vlmlab keeps both.)
"""

from __future__ import annotations

import math

from PIL import Image

from vlmlab.errors import ConfigError

FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"
MAX_IMAGE_SIZE = 4096  # transformers' absolute bound on the resized image


def idefics3_resized_size(size: tuple[int, int], longest_edge: int, side: int) -> tuple[int, int]:
    """The (height, width) transformers' Idefics3 image processor splits: the longest edge scaled to
    ``longest_edge`` (the other rounded up to even), bounded by 4096, then both sides rounded up to multiples of
    ``side`` keeping the aspect ratio (``resize_for_vision_encoder``)."""
    h, w = size
    aspect = w / h
    if w >= h:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h:
        w = math.ceil(w / side) * side
        h = math.ceil(int(w / aspect) / side) * side
    else:
        h = math.ceil(h / side) * side
        w = math.ceil(int(h * aspect) / side) * side
    return h, w


def _special(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer has no {token!r} token; add it as a special token")
    return tid


class Idefics3Tiler:
    def __init__(self, longest_edge: int | None = None, split: bool = True):
        self.longest_edge, self.split = longest_edge, split

    def grid(self, size: tuple[int, int], side: int) -> tuple[int, int]:
        """(rows, cols) of tiles; (0, 0) when the image is the global view alone."""
        if not self.split:
            return 0, 0
        h, w = idefics3_resized_size(size, self.longest_edge or 4 * side, side)
        if h > side or w > side:
            return h // side, w // side
        return 0, 0

    def num_views(self, size: tuple[int, int], side: int) -> int:
        rows, cols = self.grid(size, side)
        return rows * cols + 1

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        rows, cols = self.grid((image.height, image.width), side)
        out = []
        if rows:
            big = image.resize((cols * side, rows * side), Image.Resampling.LANCZOS)
            out = [
                big.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
                for r in range(rows)
                for c in range(cols)
            ]
        return [*out, image.resize((side, side), Image.Resampling.LANCZOS)]

    def token_ids(self, size, side, tokens_per_view, image_token_id, tokenizer) -> list[int]:
        rows, cols = self.grid(size, side)
        _special(tokenizer, FAKE)
        image = tokenizer.convert_ids_to_tokens(image_token_id) * tokens_per_view
        text = "".join(
            "".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        text += ("\n" if rows else "") + f"{FAKE}{GLOBAL}{image}{FAKE}"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = (rows * cols + 1) * tokens_per_view
        if ids.count(image_token_id) != n:
            raise ConfigError(
                f"idefics3 layout: the tokenizer splits the image token (want {n} placeholders)"
            )
        return ids


class Idefics2Tiler:
    def __init__(self, split: bool = False):
        self.split = split

    def num_views(self, size: tuple[int, int], side: int) -> int:
        return 5 if self.split else 1

    def views(self, image: Image.Image, side: int) -> list[Image.Image]:
        w, h = image.size
        parts = []
        if self.split:
            mw, mh = w // 2, h // 2
            parts = [
                image.crop(box) for box in ((0, 0, mw, mh), (mw, 0, w, mh), (0, mh, mw, h), (mw, mh, w, h))
            ]
        return [p.resize((side, side), Image.Resampling.BICUBIC) for p in [*parts, image]]

    def token_ids(self, size, side, tokens_per_view, image_token_id, tokenizer) -> list[int]:
        fake = _special(tokenizer, FAKE)
        return [fake] + ([image_token_id] * tokens_per_view + [fake]) * self.num_views(size, side)
