"""Idefics2 / Idefics3 vision towers: transformers' ``Idefics2VisionTransformer`` / ``Idefics3VisionTransformer``
(SigLIP with NaViT-style fractional position ids, so padded images of any size keep their real patches' positions).

``[N, 3, H, W]`` (+ ``pixel_attention_mask`` ``[N, H, W]``, 1 = real pixel) -> ``[N, (H/p)*(W/p), D]``: the last
layer after ``post_layernorm``, as transformers' ``get_image_features`` feeds its connector. The patch mask is
computed as transformers does: Idefics2 keeps a patch whose pixels are all real, Idefics3 one with any real pixel.
Reference: transformers ``models/idefics2/modeling_idefics2.py``, ``models/idefics3/modeling_idefics3.py``.
"""

from __future__ import annotations

import torch
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors.perceiver import patch_mask
from vlmlab.models.encoders.hf_vit import TransformersTower


class IdeficsViTTower(TransformersTower):
    extra_inputs = ("pixel_attention_mask",)
    mask_rule = "all"

    def __init__(self, config: VisionConfig, model_cls: type, config_cls: type):
        if config.select_layer != -1:
            raise ConfigError(
                f"vision.select_layer: the Idefics towers return the last layer (-1), not {config.select_layer}"
            )
        super().__init__(config, model_cls, config_cls)
        hf = self.model.config
        self.patch_size = hf.patch_size
        self.num_tokens = (hf.image_size // hf.patch_size) ** 2

    def forward(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = None
        if pixel_attention_mask is not None:
            if pixel_attention_mask.shape != (pixel_values.shape[0], *pixel_values.shape[2:]):
                raise SampleError(
                    f"pixel_attention_mask {list(pixel_attention_mask.shape)} does not match pixel_values "
                    f"{list(pixel_values.shape)} (one [H, W] mask per view)"
                )
            mask = patch_mask(pixel_attention_mask, self.patch_size, self.mask_rule)
        return self.model(pixel_values=pixel_values, patch_attention_mask=mask).last_hidden_state


class Idefics2ViTTower(IdeficsViTTower):
    mask_rule = "all"

    def __init__(self, config: VisionConfig):
        super().__init__(config, Idefics2VisionTransformer, Idefics2VisionConfig)


class Idefics3ViTTower(IdeficsViTTower):
    mask_rule = "any"

    def __init__(self, config: VisionConfig):
        super().__init__(config, Idefics3VisionTransformer, Idefics3VisionConfig)
