"""Llama-3.2-Vision's tower: transformers' ``MllamaVisionModel`` (a tiled ViT: patch embedding, CLS, gated
position and aspect-ratio tile embeddings, a local encoder masked per padding tile, a gated global encoder over all
tiles of an image, and the outputs of chosen local layers concatenated to the last one).

Input as transformers' ``MllamaImageProcessor`` writes it: ``pixel_values`` ``[B, N_img, T, 3, S, S]`` (``T =
max_num_tiles``; padding tiles and padding images are zeros), ``aspect_ratio_ids`` ``[B, N_img]`` (0 = padding
image) and ``aspect_ratio_mask`` ``[B, N_img, T]`` (1 = a real tile). Output ``[B * N_img, T * P, D]``: each image's
tiles in order, ``P = (S / patch)^2 + 1`` rows per tile (CLS first), ``D = vision_output_dim = hidden_size x
(1 + len(intermediate_layers_indices))``; padding tiles keep their rows (transformers computes them), and
``real_rows`` says which rows are real. Reference: transformers ``models/mllama/modeling_mllama.py``.
"""

from __future__ import annotations

import torch
from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
from transformers.models.mllama.modeling_mllama import MllamaVisionModel

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.encoders.hf_vit import TransformersTower


class MllamaViTTower(TransformersTower):
    extra_inputs = ("aspect_ratio_ids", "aspect_ratio_mask")

    def __init__(self, config: VisionConfig):
        if config.select_layer != -1:
            raise ConfigError(
                f"vision.select_layer: the Mllama tower returns its last layer (-1), not {config.select_layer}"
            )
        super().__init__(config, MllamaVisionModel, MllamaVisionConfig)
        hf = self.model.config
        width = hf.hidden_size * (1 + len(hf.intermediate_layers_indices))
        if hf.vision_output_dim != width:
            raise ConfigError(
                f"vision.params: vision_output_dim {hf.vision_output_dim} must be hidden_size x (1 + "
                f"len(intermediate_layers_indices)) = {width}"
            )
        self.hidden_size = width
        self.max_tiles = hf.max_num_tiles
        self.rows_per_tile = (hf.image_size // hf.patch_size) ** 2 + 1
        self.num_tokens = self.max_tiles * self.rows_per_tile

    def _check(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise SampleError("the Mllama tower needs aspect_ratio_ids and aspect_ratio_mask")
        lead = tuple(aspect_ratio_ids.shape)
        if pixel_values is not None and (
            pixel_values.dim() != 6
            or tuple(pixel_values.shape[:2]) != lead
            or pixel_values.shape[2] != self.max_tiles
        ):
            raise SampleError(
                f"pixel_values must be [B, N_img, {self.max_tiles}, 3, H, W] matching aspect_ratio_ids "
                f"{list(lead)}, got {list(pixel_values.shape)}"
            )
        if tuple(aspect_ratio_mask.shape) != (*lead, self.max_tiles):
            raise SampleError(
                f"aspect_ratio_mask must be [B, N_img, {self.max_tiles}] matching aspect_ratio_ids {list(lead)}, "
                f"got {list(aspect_ratio_mask.shape)}"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, N_img, T, 3, S, S]`` -> ``[B * N_img, T * P, D]``."""
        self._check(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        out = self.model(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask
        ).last_hidden_state  # [B, N_img, T, P, D]
        return out.flatten(0, 1).flatten(1, 2)

    def real_rows(
        self, aspect_ratio_ids: torch.Tensor | None = None, aspect_ratio_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B * N_img, T * P]`` bool: the rows of real tiles (``aspect_ratio_mask``)."""
        self._check(None, aspect_ratio_ids, aspect_ratio_mask)
        return aspect_ratio_mask.bool().flatten(0, 1).repeat_interleave(self.rows_per_tile, dim=1)
