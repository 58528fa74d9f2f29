"""Mini-Gemini's patch info mining (SYSTEMS.md §16; dvlab-research/MGM ``mgm/model/mgm_arch.py``
``unified_resampler`` / ``encode_images``; ``multi_encoder``: it takes both towers' features).

Inputs: the low-resolution (LR) tower's ``[B, n*n, D]`` (CLIP ViT-L/14-336: 24 x 24 x 1024) and the
high-resolution (HR) tower's ``[B, H*H, C]`` map, row-major (ConvNeXt-L at 768: 192 x 192 x 2880). Each LR token
is a query over its own ``m x m`` window of the HR map, ``m = H / n`` (8 at 768): one head,

    q = query_projector(X_L)                      LayerNorm(D) -> Linear(D, D)
    k = aux_projector(window), v = val_projector(window)   LayerNorm(C) -> Linear(C, D)
    X = X_L + softmax(q k^T / sqrt(D)) v          (non-finite scores set finite first, as ``nan_to_num``)

then ``projector`` (``mlp2x_gelu``: Linear, GELU, Linear) to the LLM width. The output keeps the LR token count,
whatever the HR resolution; with ``val_projector`` at zero X is exactly X_L.

MGM-HD (``image_grid=g``, ``image_global``): the LR tower is the ``tiled`` one (``encoders/tiled.py``: ``g^2``
tiles of the image at ``g x 336``, then the whole image at 336), the HR map comes from a larger image (1536 ->
384 x 384) and is cut the same way: tile t's queries mine HR quadrant t, and the whole image's queries mine the
HR map resized by ``1/g`` (bilinear). The rows come out as ``[whole image, tiles...]`` (``V * n*n`` of them).
Parameter names follow MGM (``vlm_uni_{query,aux,val}_projector`` without the prefix, ``mm_projector`` as
``projector``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors.mlp import MLPProjector
from vlmlab.models.encoders.multi import grid_side


def _norm_linear(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


class MGMConnector(nn.Module):
    """``params``: ``projector_depth`` (2 = ``mlp2x_gelu``, 1 = ``linear``), ``image_grid`` and ``image_global``
    (MGM-HD)."""

    multi_encoder = True

    def __init__(
        self,
        in_dim: list[int],
        out_dim: int,
        projector_depth: int = 2,
        image_grid: int = 1,
        image_global: bool = False,
    ):
        super().__init__()
        if not isinstance(in_dim, list) or len(in_dim) != 2:
            raise ConfigError(
                "connector mgm: needs exactly two towers, the low-resolution one (vision) and the high-resolution "
                f"one (extra_vision[0]); got widths {in_dim}"
            )
        if image_grid < 1 or (image_global and image_grid == 1):
            raise ConfigError(
                f"connector.params: image_grid {image_grid} must be >= 1, and image_global needs image_grid > 1"
            )
        d, c = in_dim
        self.query_projector = _norm_linear(d, d)
        self.aux_projector = _norm_linear(c, d)
        self.val_projector = _norm_linear(c, d)
        self.projector = MLPProjector(d, out_dim, depth=projector_depth)
        self.grid, self.global_view = image_grid, image_global
        self.views = image_grid**2 + int(image_global)

    def _windows(self, n_lr: int, n_hr: int) -> tuple[int, int]:
        """``(n, m)``: the LR grid side of one view and the HR window side, checked."""
        if n_lr % self.views:
            raise ConfigError(f"connector mgm: {n_lr} low-resolution rows are not {self.views} views")
        n = grid_side(n_lr // self.views, "connector mgm: the low-resolution tower")
        h = grid_side(n_hr, "connector mgm: the high-resolution tower")
        if h % (self.grid * n):
            raise ConfigError(
                f"connector mgm: the high-resolution grid {h} is not a multiple of {self.grid} x the "
                f"low-resolution grid {n} (each query needs a whole window)"
            )
        return n, h // self.grid // n

    def num_tokens(self, n_vis: list[int]) -> int:
        self._windows(n_vis[0], n_vis[1])
        return n_vis[0]

    def mine(self, low: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """One view: ``low`` ``[B, N, D]``, ``window`` ``[B, N, M, C]`` (token i's M HR features) -> ``X_L + out``."""
        q = self.query_projector(low)[:, :, None]  # [B, N, 1, D]
        k = self.aux_projector(window)  # [B, N, M, D]
        v = self.val_projector(window)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(k.shape[-1])).nan_to_num()  # [B, N, 1, M]
        return low + (scores.softmax(-1) @ v)[:, :, 0]

    def mined(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``[low [B, V*n*n, D], high [B, H*H, C]] -> X [B, V*n*n, D]`` before the projector."""
        low, high = features
        if low.shape[0] != high.shape[0]:
            raise SampleError(f"connector mgm: towers gave batch sizes {low.shape[0]} and {high.shape[0]}")
        b, c, g = high.shape[0], high.shape[-1], self.grid
        n, m = self._windows(low.shape[1], high.shape[1])
        hmap = high.transpose(1, 2).reshape(b, c, g * n * m, g * n * m)
        low = low.unflatten(1, (self.views, n * n))  # [B, V, n*n, D]
        # HR views in the LR views' order: the tiles row-major, then the whole map resized by 1 / g.
        views = (
            hmap.reshape(b, c, g, n * m, g, n * m)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b, g * g, c, n * m, n * m)
        )
        if self.global_view:
            whole = F.interpolate(hmap.float(), size=(n * m, n * m), mode="bilinear", align_corners=False)
            views = torch.cat([views, whole.to(hmap.dtype)[:, None]], dim=1)
        # [B, V, C, n*m, n*m] -> [B, V, n*n, m*m, C]: LR cell (i, j) gets rows i*m.., columns j*m.. of its view.
        windows = views.reshape(b, self.views, c, n, m, n, m).permute(0, 1, 3, 5, 4, 6, 2)
        x = self.mine(low.flatten(0, 1), windows.reshape(b * self.views, n * n, m * m, c))
        x = x.unflatten(0, (b, self.views))
        if self.global_view:  # MGM's order: the whole image first, then the tiles
            x = torch.cat([x[:, -1:], x[:, :-1]], dim=1)
        return x.flatten(1, 2)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.mined(features))
