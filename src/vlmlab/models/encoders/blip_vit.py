"""BLIP-2's vision tower: EVA-CLIP ViT-g/14 as transformers' ``Blip2VisionModel`` (SYSTEMS.md §2).

``[B, 3, H, W] -> [B, 1 + N_patch, D]``: every layer (transformers' conversion already dropped EVA's last one),
then ``post_layernorm`` (LAVIS's trainable ``ln_vision``), CLS kept: the Q-Former cross-attends to all 257 rows
at 224 px. ``InstructBlipVisionModel`` has the same modules and names, so this one tower serves BLIP-2,
InstructBLIP and InternLM-XComposer (v1). Reference: transformers ``models/blip_2/modeling_blip_2.py``.
"""

from __future__ import annotations

import torch
from transformers import Blip2VisionConfig, Blip2VisionModel

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.models.encoders.hf_vit import TransformersTower


class BlipViTTower(TransformersTower):
    """vision.select_layer must be -1 and select_feature ``cls_patch``: the tower is used whole, as BLIP-2 does."""

    def __init__(self, config: VisionConfig):
        if config.select_layer != -1 or config.select_feature != "cls_patch":
            raise ConfigError(
                "vision 'blip_vit' returns the last layer with the CLS row (BLIP-2): set select_layer=-1 and "
                f"select_feature='cls_patch', not {config.select_layer} / {config.select_feature!r}"
            )
        super().__init__(config, Blip2VisionModel, Blip2VisionConfig)
        hf = self.model.config
        self.num_tokens = (hf.image_size // hf.patch_size) ** 2 + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.model.embeddings(pixel_values)  # [B, 1 + N_patch, D]
        for layer in self.model.encoder.layers:
            h = layer(h)
        return self.model.post_layernorm(h)
