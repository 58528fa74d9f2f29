"""Idefics (v1) vision tower: transformers' ``IdeficsVisionTransformer``, a CLIP ViT (CLS token, ``pre_layrnorm``)
under Idefics' own config.

``[N, 3, S, S] -> [N, 1 + (S/p)^2, D]``: what transformers' ``IdeficsModel.forward`` feeds its perceiver (or, without
it, the gated cross-attention): the last layer's ``last_hidden_state``, CLS row kept, without ``post_layernorm``
(which only the pooled CLS output uses). That is ``select_layer=-1, select_feature="cls_patch"``; other selections
work as for CLIP (``hf_vit.py``) but have no transformers counterpart. Reference: transformers
``models/idefics/vision.py``, ``models/idefics/modeling_idefics.py``.
"""

from __future__ import annotations

import torch
from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig
from transformers.models.idefics.vision import IdeficsVisionTransformer

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.models.encoders.hf_vit import HFVisionTower


class Idefics1ViTTower(HFVisionTower):
    def __init__(self, config: VisionConfig):
        if config.pretrained:
            raise ConfigError(
                "vision.pretrained: the Idefics (v1) tower has no checkpoint of its own; its weights come with "
                "an idefics checkpoint (vlmlab.from_pretrained of the transformers directory)"
            )
        super().__init__(config, IdeficsVisionTransformer, IdeficsVisionConfig)
        # A bare nn.Module (not a PreTrainedModel) gets no attention implementation: transformers' IdeficsModel
        # hands it its own, SDPA by default.
        self.model.config._attn_implementation = "sdpa"

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.pre_layrnorm(self.model.embeddings(pixel_values))
