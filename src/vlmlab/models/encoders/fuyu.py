"""Fuyu's "tower" (SYSTEMS.md §7): no image encoder at all. Each ``p x p`` patch of the image is flattened
**channels-last** into one ``p * p * 3`` vector, and the ``linear`` connector (Fuyu's ``vision_embed_tokens``)
projects it into the decoder. Reference: transformers ``models/fuyu/image_processing_fuyu.py``
``patchify_image`` (``unfold`` then ``permute(0, 2, 3, 4, 1)``) and ``modeling_fuyu.py``.

``[N, 3, p, p] -> [N, 1, p * p * 3]``: one view per patch (the ``fuyu`` tiler, ``models/tiling/fuyu.py``, cuts the
resized and padded image into its patches, row-major), each flattened in (py, px, channel) order. The tower has no
weights; ``config.image_size`` is the patch side.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError, SampleError

CHANNELS = 3


class FuyuPatches(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.params:
            raise ConfigError(
                f"vision.params: the fuyu_patches tower takes none, got {sorted(config.params)}"
            )
        self.patch = config.image_size
        self.hidden_size = CHANNELS * self.patch * self.patch
        self.num_tokens = 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (CHANNELS, p, p):
            raise SampleError(
                f"fuyu_patches: pixel_values must be patches [N, {CHANNELS}, {p}, {p}], "
                f"got {list(pixel_values.shape)}"
            )
        return pixel_values.permute(0, 2, 3, 1).reshape(len(pixel_values), 1, self.hidden_size)


def views_from_patches(patches: torch.Tensor, patch: int) -> torch.Tensor:
    """transformers' flattened patches (``FuyuProcessor``'s ``image_patches`` / ``pixel_values``,
    ``[..., N, p * p * 3]``) as vlmlab's ``pixel_values`` ``[N, 3, p, p]``: the inverse of ``FuyuPatches``."""
    width = CHANNELS * patch * patch
    if patches.shape[-1] != width:
        raise SampleError(
            f"fuyu patches must be [N, {width}] ({patch}-px patches), got {list(patches.shape)}"
        )
    return patches.reshape(-1, patch, patch, CHANNELS).permute(0, 3, 1, 2)
