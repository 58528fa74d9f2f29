"""InternViT (InternVL 1.5's tower, SYSTEMS.md §18) from transformers' ``InternVLVisionModel``, with InternVL's
feature selection: ``hidden_states[select_layer]``, where ``-1`` is the model's ``last_hidden_state`` (after its
final ``layernorm``, an identity when ``use_mean_pooling``), as ``InternVLModel.get_image_features`` takes it;
``patch`` drops the CLS row (``vision_feature_select_strategy="default"``), ``cls_patch`` keeps it (``"full"``).

Only the layers up to the selected one run. The weights of the others stay in the module, so checkpoints keep
every key and load and export unchanged. Reference: transformers ``models/internvl/modeling_internvl.py``.
"""

from __future__ import annotations

import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from vlmlab.config import VisionConfig
from vlmlab.errors import SampleError
from vlmlab.models.encoders.hf_vit import TransformersTower, check_select_feature


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class InternViTTower(TransformersTower):
    """``[B, 3, S, S] -> [B, (1 +) (S / p)^2, D_vis]`` from an ``InternVLVisionModel``."""

    def __init__(self, config: VisionConfig):
        check_select_feature(config)
        super().__init__(config, InternVLVisionModel, InternVLVisionConfig)
        self.select_layer = config.select_layer
        self.select_feature = config.select_feature
        # Only -1 (the model's last_hidden_state) passes the final layernorm.
        self.num_layers_run = self.layers_to_run(self.select_layer)
        self.final_norm = self.select_layer == -1
        hf = self.model.config
        (h, w), (ph, pw) = _pair(hf.image_size), _pair(hf.patch_size)
        self.image_size = (h, w)
        self.num_tokens = (h // ph) * (w // pw) + int(self.select_feature == "cls_patch")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise SampleError(
                f"internvit: pixel_values must be [N, 3, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {list(pixel_values.shape)}"
            )
        feats = self.model.embeddings(pixel_values)  # [B, 1 + N_patch, D]
        for layer in self.model.encoder.layer[: self.num_layers_run]:
            feats = layer(feats)
        if self.final_norm:
            feats = self.model.layernorm(feats)
        return feats[:, 1:] if self.select_feature == "patch" else feats
