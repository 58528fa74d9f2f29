"""ConvNeXt as a multi-stage feature tower: transformers' ``ConvNextModel``, read as Mini-Gemini reads OpenCLIP's
ConvNeXt-L (SYSTEMS.md §16; dvlab-research/MGM ``mgm/model/multimodal_encoder/openclip_encoder.py``).

``[B, 3, S, S] -> [B, (S/4)^2, sum(hidden_sizes)]``: the stem (a stride-4 patch convolution and its LayerNorm)
and the stages run, each stage's output map (stage 0 at ``S/4``, stage i at ``S/4/2^i``) is resized bilinearly
(``align_corners=False``) to stage 0's size, and the maps are concatenated on channels (ConvNeXt-L: 192 + 384 +
768 + 1536 = 2880), then read row-major as tokens. The model's final LayerNorm and pooling are never used (MGM
drops the head); their weights stay in the module so that transformers checkpoints load unchanged.

``params`` are ``ConvNextConfig`` fields (``hidden_sizes``, ``depths``, ``drop_path_rate`` ...); ``pretrained``
names a transformers ConvNext directory. MGM's weights are OpenCLIP's (timm key names), which this tower does not
convert. ``select_layer`` / ``select_feature`` are unused: every stage is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConvNextConfig, ConvNextModel

from vlmlab.config import VisionConfig, architecture_fields
from vlmlab.errors import ConfigError


class ConvNextTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.pretrained:
            self.model = ConvNextModel.from_pretrained(config.pretrained, use_safetensors=True)
        else:
            self.model = ConvNextModel(ConvNextConfig(image_size=config.image_size, **config.params))
        hf = self.model.config
        self.stride = hf.patch_size
        if config.image_size % self.stride:
            raise ConfigError(
                f"vision.image_size: {config.image_size} is not a multiple of the ConvNeXt's stem stride {self.stride}"
            )
        self.hidden_size = sum(hf.hidden_sizes)
        self.num_tokens = (config.image_size // self.stride) ** 2

    def architecture_params(self) -> dict:
        """The transformers config as ``params`` (``image_size`` is the VisionConfig's own field)."""
        return architecture_fields(self.model.config.to_dict(), drop=("image_size",))

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S] -> [B, sum(hidden_sizes), S/4, S/4]``: every stage on stage 0's grid."""
        x = self.model.embeddings(pixel_values)
        maps = []
        for stage in self.model.encoder.stages:
            x = stage(x)
            maps.append(x)
        size = maps[0].shape[-2:]
        # Resized in float32, as MGM does (bf16 / fp16 maps lose less).
        resized = (
            F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False).to(m.dtype)
            for m in maps[1:]
        )
        return torch.cat([maps[0], *resized], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)
