"""Space-to-channel merging (pixel shuffle): an ``H x W`` grid of ``C``-wide tokens -> ``H/r x W/r`` tokens of
``r*r*C`` channels (InternVL 1.5, Idefics3, VILA-1.5's downsample, XComposer2-4KHD; SYSTEMS.md §0, §18).

Output token ``(i, j)`` is the concatenation of input tokens ``(r*i + dy, r*j + dx)`` in channel order
``(dy, dx, c)``: InternVL's ``pixel_shuffle`` (``ps_version='v2'``) and Idefics3's ``pixel_shuffle`` both give
this order. It is a permutation, so ``channel_to_space`` inverts it exactly.
"""

from __future__ import annotations

import math

import torch

from vlmlab.errors import ConfigError


def _side(n: int, r: int) -> int:
    side = math.isqrt(n)
    if side * side != n or side % r:
        raise ConfigError(f"pixel shuffle needs a square grid whose side divides by {r}, got {n} tokens")
    return side


def space_to_channel(x: torch.Tensor, r: int) -> torch.Tensor:
    """``[B, H*W, C] -> [B, H*W / r^2, r^2 * C]`` (a square grid, row-major), channel order ``(dy, dx, c)``."""
    b, n, c = x.shape
    s = _side(n, r)
    x = x.reshape(b, s // r, r, s // r, r, c)  # [b, i, dy, j, dx, c]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (s // r) ** 2, r * r * c)


def channel_to_space(x: torch.Tensor, r: int) -> torch.Tensor:
    """The exact inverse of ``space_to_channel``."""
    b, n, rc = x.shape
    s = math.isqrt(n)
    c = rc // (r * r)
    x = x.reshape(b, s, s, r, r, c).permute(0, 1, 3, 2, 4, 5)  # [b, i, dy, j, dx, c]
    return x.reshape(b, (s * r) ** 2, c)
