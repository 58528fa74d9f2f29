"""InternViT (InternVL 1.5's tower, SYSTEMS.md §18) from transformers' ``InternVLVisionModel``, with InternVL's
feature selection: ``hidden_states[select_layer]``, where ``-1`` is the model's ``last_hidden_state`` (after its
final ``layernorm``, an identity when ``use_mean_pooling``), as ``InternVLModel.get_image_features`` takes it;
``patch`` drops the CLS row (``vision_feature_select_strategy="default"``), ``cls_patch`` keeps it (``"full"``).

Only the layers up to the selected one run. The weights of the others stay in the module, so checkpoints keep
every key and load and export unchanged. Reference: transformers ``models/internvl/modeling_internvl.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel

from vlmlab.config import VisionConfig, architecture_fields
from vlmlab.errors import ConfigError, SampleError

SELECT_FEATURES = ("patch", "cls_patch")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class InternViTTower(nn.Module):
    """``[B, 3, S, S] -> [B, (1 +) (S / p)^2, D_vis]`` from an ``InternVLVisionModel``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.select_feature not in SELECT_FEATURES:
            raise ConfigError(
                f"vision.select_feature: {config.select_feature!r} is not one of {list(SELECT_FEATURES)}"
            )
        self.select_layer = config.select_layer
        self.select_feature = config.select_feature
        if config.pretrained:
            self.model = InternVLVisionModel.from_pretrained(config.pretrained, use_safetensors=True)
        else:
            self.model = InternVLVisionModel(
                InternVLVisionConfig(image_size=config.image_size, **config.params)
            )
        hf = self.model.config
        n_layers = hf.num_hidden_layers
        if not -(n_layers + 1) <= self.select_layer <= n_layers:
            raise ConfigError(f"vision.select_layer: {self.select_layer} out of range for {n_layers} layers")
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i; only -1 is normed.
        self.num_layers_run = self.select_layer % (n_layers + 1)
        self.final_norm = self.select_layer == -1
        self.hidden_size = hf.hidden_size
        (h, w), (ph, pw) = _pair(hf.image_size), _pair(hf.patch_size)
        self.image_size = (h, w)
        self.num_tokens = (h // ph) * (w // pw) + int(self.select_feature == "cls_patch")

    def architecture_params(self) -> dict:
        """The tower's transformers config as ``params`` (``image_size`` is the VisionConfig's own field)."""
        return architecture_fields(self.model.config.to_dict(), drop=("image_size",))

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
