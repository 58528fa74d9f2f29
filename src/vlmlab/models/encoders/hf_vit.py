"""Vision transformer towers from transformers: CLIP (LLaVA, ...) and SigLIP, with LLaVA's feature selection.

``hidden_states[select_layer]`` is returned (LLaVA: -2, the penultimate layer; InternVL: -1); ``patch`` drops the
CLS row (``[:, 1:]``), ``cls_patch`` keeps it. SigLIP has no CLS token, so both keep every row.
Reference: haotian-liu/LLaVA ``llava/model/multimodal_encoder/clip_encoder.py`` (SYSTEMS.md §0, §3).

Only the layers up to the selected one run: LLaVA's -2 discards the last layer's output, and the post-layernorm
(and SigLIP's pooling head) are never used, so none of them is computed. Their weights stay in the module, so
checkpoints keep every key and load and export unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vlmlab.config import VisionConfig, architecture_fields
from vlmlab.errors import ConfigError

SELECT_FEATURES = ("patch", "cls_patch")


class TransformersTower(nn.Module):
    """The base of every tower that is a transformers vision model (CLIP, SigLIP, InternViT, BLIP-2's EVA ViT,
    Idefics2/3's): ``self.model`` is the pretrained model when ``config.pretrained`` names one, else a random one
    in the shape of ``config.params``; ``architecture_params`` records that shape in checkpoints."""

    def __init__(self, config: VisionConfig, model_cls: type, config_cls: type):
        super().__init__()
        if config.pretrained:
            self.model = model_cls.from_pretrained(config.pretrained, use_safetensors=True)
        else:
            self.model = model_cls(config_cls(image_size=config.image_size, **config.params))
        self.hidden_size = self.model.config.hidden_size

    def architecture_params(self) -> dict:
        """The tower's transformers config as ``params`` (``image_size`` is the VisionConfig's own field)."""
        return architecture_fields(self.model.config.to_dict(), drop=("image_size",))

    def layers_to_run(self, select_layer: int) -> int:
        """How many encoder layers produce ``hidden_states[select_layer]`` (checked against the depth)."""
        n_layers = self.model.config.num_hidden_layers
        # hidden_states has n_layers + 1 entries (embeddings first), so valid indices are [-(n+1), n].
        if not -(n_layers + 1) <= select_layer <= n_layers:
            raise ConfigError(f"vision.select_layer: {select_layer} out of range for {n_layers} layers")
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
        return select_layer % (n_layers + 1)


def check_select_feature(config: VisionConfig) -> None:
    if config.select_feature not in SELECT_FEATURES:
        raise ConfigError(
            f"vision.select_feature: {config.select_feature!r} is not one of {list(SELECT_FEATURES)}"
        )


class HFVisionTower(TransformersTower):
    """``[B, 3, H, W] -> [B, N_vis, D_vis]`` from a transformers vision transformer."""

    has_cls = True

    def __init__(self, config: VisionConfig, model_cls: type, config_cls: type):
        check_select_feature(config)
        super().__init__(config, model_cls, config_cls)
        self.select_layer = config.select_layer
        self.select_feature = config.select_feature
        self.num_layers_run = self.layers_to_run(self.select_layer)
        hf = self.model.config
        n_patches = (hf.image_size // hf.patch_size) ** 2
        keep_cls = self.has_cls and self.select_feature == "cls_patch"
        self.num_tokens = n_patches + int(keep_cls)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The input of the first encoder layer, ``[B, (1 +) N_patch, D]``."""
        return self.model.embeddings(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.embed(pixel_values)  # [B, (1 +) N_patch, D]
        for layer in self.model.encoder.layers[: self.num_layers_run]:
            feats = layer(feats, None)  # no attention mask: every patch sees every patch
        if self.has_cls and self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats


class CLIPTower(HFVisionTower):
    def __init__(self, config: VisionConfig):
        super().__init__(config, CLIPVisionModel, CLIPVisionConfig)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # CLIP normalises the embeddings before the first layer (``pre_layrnorm``, transformers' spelling).
        return self.model.pre_layrnorm(self.model.embeddings(pixel_values))


class SiglipTower(HFVisionTower):
    has_cls = False

    def __init__(self, config: VisionConfig):
        super().__init__(config, SiglipVisionModel, SiglipVisionConfig)
