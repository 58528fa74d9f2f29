"""Space-to-channel merging (pixel shuffle): an ``H x W`` grid of ``C``-wide tokens -> ``H/r x W/r`` tokens of
``r*r*C`` channels (InternVL 1.5, Idefics3, VILA-1.5's downsample, XComposer2-4KHD; SYSTEMS.md §0, §18).

Output token ``(i, j)`` is the concatenation of input tokens ``(r*i + dy, r*j + dx)`` in channel order
``(dy, dx, c)``: InternVL's ``pixel_shuffle`` (``ps_version='v2'``) and Idefics3's ``pixel_shuffle`` both give
this order. It is a permutation, so ``channel_to_space`` inverts it exactly.

Connectors built on it: ``pixel_shuffle_mlp`` (InternVL 1.5's ``mlp1``: shuffle by ``ratio``, then LN -> Linear ->
GELU -> Linear; ``ps_version='v1'`` reproduces the InternVL 1.5 checkpoints' transposed grid) and
``mlp_downsample`` (VILA-1.5: odd grids zero-padded, 2 x 2 shuffle, the same LN-MLP; SYSTEMS.md §10).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmlab.errors import ConfigError, SampleError


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


PS_VERSIONS = ("v1", "v2")


def transpose_grid(x: torch.Tensor) -> torch.Tensor:
    """``[B, S*S, C]`` row-major tokens -> the same tokens in column-major order (the grid transposed)."""
    b, n, c = x.shape
    s = math.isqrt(n)
    return x.reshape(b, s, s, c).transpose(1, 2).reshape(b, n, c)


def pixel_shuffle(x: torch.Tensor, r: int, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's ``pixel_shuffle``: ``space_to_channel``; ``ps_version='v1'`` (InternVL 1.5's checkpoints) skips
    the reference's final permute, so its output grid is transposed (token ``(j, i)`` holds v2's ``(i, j)``)."""
    if ps_version not in PS_VERSIONS:
        raise ConfigError(f"pixel shuffle: ps_version {ps_version!r} is not one of {list(PS_VERSIONS)}")
    y = space_to_channel(x, r)
    return transpose_grid(y) if ps_version == "v1" else y


def _check_tokens(x: torch.Tensor, in_dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != in_dim:
        raise SampleError(f"{who}: expected features [B, N, {in_dim}], got {list(x.shape)}")


class PixelShuffleMLP(nn.Module):
    """InternVL 1.5's ``mlp1`` (transformers' ``InternVLMultiModalProjector``): pixel shuffle by ``ratio``, then
    LayerNorm(r^2 C) -> Linear(r^2 C -> d) -> GELU -> Linear(d -> d). ``[B, S*S, C] -> [B, S*S / r^2, d]``."""

    def __init__(self, in_dim: int, out_dim: int, ratio: int = 2, ps_version: str = "v2"):
        super().__init__()
        if not isinstance(ratio, int) or ratio < 1:
            raise ConfigError(f"pixel_shuffle_mlp: ratio must be a positive integer, got {ratio!r}")
        if ps_version not in PS_VERSIONS:
            raise ConfigError(
                f"pixel_shuffle_mlp: ps_version {ps_version!r} is not one of {list(PS_VERSIONS)}"
            )
        self.in_dim, self.ratio, self.ps_version = in_dim, ratio, ps_version
        wide = in_dim * ratio * ratio
        self.layers = nn.Sequential(
            nn.LayerNorm(wide), nn.Linear(wide, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n_vis: int) -> int:
        return _side(n_vis, self.ratio) ** 2 // self.ratio**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.in_dim, "pixel_shuffle_mlp")
        return self.layers(pixel_shuffle(x, self.ratio, self.ps_version))


def downsample_2x2(x: torch.Tensor, ps_version: str = "v1") -> torch.Tensor:
    """VILA-1.5's ``DownSampleBlock``: a square ``S x S`` grid zero-padded to even sides (a row at the bottom, a
    column at the right), then 2 x 2 space-to-channel in ``(dy, dx, c)`` order: ``[B, S*S, C] ->
    [B, ceil(S/2)^2, 4C]``. VILA-1.5's ``flat_square`` has no final permute (``v1``: the grid comes out
    transposed, like InternVL's v1); NVILA's added it (``v2``)."""
    if ps_version not in PS_VERSIONS:
        raise ConfigError(f"mlp_downsample: ps_version {ps_version!r} is not one of {list(PS_VERSIONS)}")
    b, n, c = x.shape
    s = math.isqrt(n)
    if s * s != n:
        raise SampleError(f"mlp_downsample needs a square token grid, got {n} tokens")
    if s % 2:
        grid = nn.functional.pad(x.reshape(b, s, s, c), (0, 0, 0, 1, 0, 1))  # zeros after the last row/column
        x = grid.reshape(b, (s + 1) ** 2, c)
    return pixel_shuffle(x, 2, ps_version)


class DownsampleMLP(nn.Module):
    """VILA-1.5's ``mlp_downsample`` projector: ``downsample_2x2`` then LN(4C) -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, ps_version: str = "v1"):
        super().__init__()
        if ps_version not in PS_VERSIONS:
            raise ConfigError(f"mlp_downsample: ps_version {ps_version!r} is not one of {list(PS_VERSIONS)}")
        self.in_dim, self.ps_version = in_dim, ps_version
        self.layers = nn.Sequential(
            nn.LayerNorm(4 * in_dim), nn.Linear(4 * in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n_vis: int) -> int:
        s = math.isqrt(n_vis)
        if s * s != n_vis:
            raise ConfigError(f"mlp_downsample needs a square token grid, got {n_vis} tokens")
        return ((s + 1) // 2) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.in_dim, "mlp_downsample")
        return self.layers(downsample_2x2(x, self.ps_version))


class Idefics3Connector(nn.Module):
    """``idefics3`` (transformers ``Idefics3Connector``): ``[B, N, D] -> [B, N/r^2, D_lm]`` by pixel shuffle
    (channel order (dy, dx, c)) then a bias-free Linear."""

    def __init__(self, in_dim: int, out_dim: int, scale_factor: int = 2):
        super().__init__()
        self.scale_factor = scale_factor
        self.proj = nn.Linear(in_dim * scale_factor**2, out_dim, bias=False)

    def num_tokens(self, n_vis: int) -> int:
        return _side(n_vis, self.scale_factor) ** 2 // self.scale_factor**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(space_to_channel(x, self.scale_factor))
