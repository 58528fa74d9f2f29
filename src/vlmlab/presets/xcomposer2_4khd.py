"""InternLM-XComposer2-4KHD (Dong et al., 2024; SYSTEMS.md §15): XComposer2 with dynamic resolution up to 4K.

- ``xcomposer2-4khd``: CLIP ViT-L/14 at 336 (last layer, patch tokens: 24 x 24) on the ``hd`` tiler's views (a
  global 336 view + up to ``hd_num`` = 55 tiles of 336, the paper's 4K budget; the chat default is 25), each view
  merged 2 x 2 into 144 tokens of 4096 channels, ``sub_GN`` after every row and ``glb_GN`` between the global and
  the local views (``models/tiling/hd.py``), ``vision_proj`` (mlp2x_gelu 4096 -> 4096), and XComposer2's
  InternLM2-7B-shaped decoder with **Partial LoRA** (r = alpha = 256) on image rows, separators included. An
  image is ``(rows * cols + 1) * 144 + 1 + (rows + 1) * 12`` tokens (up to 8,737 at HD-55), so ``max_length``
  is 16,384. Recipe as XComposer2's (pretraining trains the ViT, the PLoRA, the projector and the separators
  with the LLM frozen; SFT trains everything; paper; verify).
- ``xcomposer2-4khd-tiny``: the same structure at CPU scale: a from-scratch ConvNet on 32-px tiles (4 x 4 tokens,
  merged to 2 x 2 of 384 channels), ``hd_num`` 6 (a 128-px square becomes 2 x 2 tiles of 32 px), the small Llama
  with PLoRA r = 32, and the fusion presets' ``llm`` stand-in stage first (``presets/fusion.py``).
"""

from __future__ import annotations

import dataclasses

from vlmlab.config import ConnectorConfig, FusionConfig, LanguageConfig, ModelConfig
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.presets.fusion import (
    ALL_ROUTED,
    FROZEN_LLM,
    INTERNLM2_7B,
    _clip,
    _processor,
    _tiny,
    _tiny_preset,
    frozen_llm_recipe,
    xcomposer2,
)
from vlmlab.presets.llava import CLIP_VIT_L14

HD_TILE = 336
HD_NUM = 55  # the 4K budget (3840 x 1600 and beyond); the chat default is 25
MAX_LENGTH = 16384
TINY_TILE = 32
TINY_HD_NUM = 6


def _plora(rank: int) -> FusionConfig:
    """XComposer2's Partial LoRA on every projection, alpha = rank (scale 1)."""
    return FusionConfig(mode="plora", targets=list(ALL_ROUTED), rank=rank, alpha=float(rank))


def xcomposer2_4khd() -> Preset:
    """InternLM-XComposer2-4KHD-7B's layout: CLIP-L/14-336 on HD-55 views -> 2 x 2 merge + separators ->
    mlp2x_gelu -> InternLM2-7B with Partial LoRA."""
    processor = _processor(HD_TILE, tiler="hd", tiler_params={"hd_num": HD_NUM})
    config = ModelConfig(
        vision=_clip(HD_TILE, CLIP_VIT_L14, select_layer=-1),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", params=dict(INTERNLM2_7B)),
        processor=dataclasses.replace(processor, max_length=MAX_LENGTH),
        fusion=_plora(256),
        preset="xcomposer2-4khd",
    )
    note = {"source": "InternLM-XComposer2-4KHD paper, section 3 (as XComposer2; verify)"}
    recipe = [
        dataclasses.replace(
            s,
            train=(*s.train, "newline"),
            lr={**s.lr, "newline": s.lr["connector"]},
            extra=note,
        )
        for s in xcomposer2().recipe
    ]
    return Preset(
        "xcomposer2-4khd",
        config,
        pretrained_tokenizer(config),
        recipe,
        description="InternLM-XComposer2-4KHD (HD-55 global + local 336 views, 2x2 merge, row separators, PLoRA)",
    )


def xcomposer2_4khd_tiny() -> Preset:
    config = _tiny(
        "xcomposer2-4khd-tiny",
        ConnectorConfig(name="mlp2x_gelu"),
        _plora(32),
        view=TINY_TILE,
        processor={"tiler": "hd", "tiler_params": {"hd_num": TINY_HD_NUM}},
    )
    return _tiny_preset(
        "xcomposer2-4khd-tiny",
        config,
        frozen_llm_recipe(700, train=(*FROZEN_LLM, "newline")),
        "InternLM-XComposer2-4KHD's HD views, 2x2 merge and separators with Partial LoRA at CPU scale",
    )
