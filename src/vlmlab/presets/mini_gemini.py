"""Mini-Gemini / MGM (Li et al., 2024; SYSTEMS.md §16; dvlab-research/MGM
``scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh``, ``stage_2_full_v7b_672_hr_1536.sh``).

- ``mini-gemini`` (MGM-7B): CLIP ViT-L/14-336 (layer -2, CLS dropped: 24 x 24 x 1024) as the low-resolution
  tower, ConvNeXt-L at 768 (every stage on the 192 x 192 grid: 2880 channels) as the high-resolution one, patch
  info mining (``mgm``: each of the 576 queries over its 8 x 8 window, then ``mlp2x_gelu``) and a Vicuna-7B-shaped
  decoder. The processor's view is the 768 px one (padded to a square, CLIP normalisation for both towers); the
  ViT reads it resized to 336.
- ``mini-gemini-hd`` (MGM-7B-HD): the ViT on 2 x 2 tiles of the image at 672 plus the whole image at 336 (the
  ``tiled`` tower), the ConvNeXt at 1536 (384 x 384), 5 x 576 = 2880 visual tokens.

Recipe (both encoders frozen): stage 1 trains the connector (the three mining projections and the projector) at
lr 1e-3, batch 256, on the 1.2M-sample pretraining set; stage 2 adds the LLM at 2e-5, batch 128, on the 1.5M
instruction set (sample counts from the paper: verify). MGM-HD runs stage 2 only, on MGM-7B's stage-1 connector.

The real-scale presets take the decoder (and tokenizer) from ``language.pretrained``; the ConvNeXt weights would
be OpenCLIP's ``convnext_large_d_320`` (laion2B), which ``encoders/convnext.py`` does not convert.

``mini-gemini-tiny`` keeps the structure at CPU scale: a 3-layer CLIP-shaped ViT at 32 px (4 x 4 queries), a
ConvNeXt at 64 px (16 x 16 map, 4 x 4 windows), the small Llama, and MGM's two stages with both towers frozen, as
in the paper (random here: a random frozen tower keeps colour, one trained at full rate from scratch loses it,
docs/connectors.md). Its decoder is random, so the second stage trains it from a higher rate than MGM's 2e-5
(as ``llava-1.5-tiny``). Its tokenizer knows the ``detail`` task's words (the fine-stripes task a 32 px view
cannot read and a 64 px one can).
"""

from __future__ import annotations

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
)
from vlmlab.presets.base import Preset
from vlmlab.presets.llava import CLIP_VIT_L14, VICUNA_7B, _pretrained_tokenizer
from vlmlab.processing.templates import LLAVA_V1_SYSTEM
from vlmlab.training.stages import Stage

# OpenCLIP convnext_large_d_320's trunk (timm convnext_large): four stages of 192..1536 channels, 3-3-27-3 blocks.
CONVNEXT_L = {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]}
LR_SIDE = 336


def _config(name: str, hr_side: int, grid: int) -> ModelConfig:
    """CLIP-L/14 at 336 (on ``grid x grid`` tiles + the whole image when grid > 1) + ConvNeXt-L at ``hr_side``."""
    clip = dict(CLIP_VIT_L14)
    if grid > 1:
        vision = VisionConfig(
            name="tiled",
            image_size=grid * LR_SIDE,
            params={"tower": "clip", "grid": grid, "global_view": True, **clip},
        )
    else:
        vision = VisionConfig(name="clip", image_size=LR_SIDE, params=clip)
    return ModelConfig(
        vision=vision,
        extra_vision=[VisionConfig(name="convnext", image_size=hr_side, params=dict(CONVNEXT_L))],
        connector=ConnectorConfig(
            name="mgm", params={"image_grid": grid, "image_global": True} if grid > 1 else {}
        ),
        language=LanguageConfig(model_type="llama", params=dict(VICUNA_7B)),
        processor=ProcessorConfig(
            image_size=hr_side,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            pad_to_square=True,
            resize="shortest_edge_crop",
            max_length=4096 if grid > 1 else 2048,
        ),
        preset=name,
    )


PRETRAIN = Stage(
    name="pretrain",
    train=("connector",),
    lr={"connector": 1e-3},
    steps=4688,  # 1.2M samples / 256, one epoch
    batch_size=256,
    warmup_steps=141,
    extra={"source": "MGM stage-1 script (16 per GPU x 16 GPUs); 1.2M samples from the paper (verify)"},
)


def _finetune(extra: dict) -> Stage:
    return Stage(
        name="finetune",
        train=("connector", "language"),
        lr={"connector": 2e-5, "language": 2e-5},
        steps=11719,  # 1.5M samples / 128, one epoch
        batch_size=128,
        warmup_steps=352,
        extra={"source": "MGM stage-2 script; 1.5M samples from the paper (verify)", **extra},
    )


def mini_gemini() -> Preset:
    """MGM-7B: CLIP-L/14-336 + ConvNeXt-L-768, patch info mining (576 tokens), Vicuna-7B."""
    config = _config("mini-gemini", hr_side=768, grid=1)
    return Preset(
        "mini-gemini",
        config,
        _pretrained_tokenizer(config),
        [PRETRAIN, _finetune({})],
        description="Mini-Gemini (CLIP-L/14-336 queries mining ConvNeXt-L-768 windows)",
    )


def mini_gemini_hd() -> Preset:
    """MGM-7B-HD: CLIP-L/14-336 on 2 x 2 tiles + the whole image, ConvNeXt-L-1536, 2880 tokens, Vicuna-7B."""
    config = _config("mini-gemini-hd", hr_side=1536, grid=2)
    return Preset(
        "mini-gemini-hd",
        config,
        _pretrained_tokenizer(config),
        [_finetune({"start": "MGM-7B's stage-1 connector (trained at 336 / 768)"})],
        description="Mini-Gemini-HD (CLIP-L/14 on 2x2 tiles + global, ConvNeXt-L-1536)",
    )


# -- CPU scale ---------------------------------------------------------------------------------------------------
TINY_LR_TOWER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 8,
}
TINY_CONVNEXT = {"hidden_sizes": [32, 48, 64, 96], "depths": [1, 1, 1, 1]}


def mini_gemini_tiny() -> Preset:
    """MGM at CPU scale: ViT at 32 px (16 queries) + ConvNeXt at 64 px (16 x 16 x 240), small Llama."""
    from vlmlab.presets.tiny import TINY_LLAMA, world_tokenizer

    config = ModelConfig(
        vision=VisionConfig(name="clip", image_size=32, params=dict(TINY_LR_TOWER)),
        extra_vision=[VisionConfig(name="convnext", image_size=64, params=dict(TINY_CONVNEXT))],
        connector=ConnectorConfig(name="mgm"),
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=64,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            pad_to_square=True,
            resize="shortest_edge_crop",
            max_length=256,
        ),
        preset="mini-gemini-tiny",
    )
    # MGM's stage 1 (the mining projections and the projector, on captions) and stage 2 (with the LLM, on
    # everything). The tiny LLM and towers are random, so unlike MGM's the LLM trains in stage 1 and the towers in
    # stage 2 (10x slower): with MGM's trainable sets the tiny model learnt nothing from the image in 1000 steps.
    recipe = [
        Stage(
            name="pretrain",
            train=("connector", "language"),
            lr={"connector": 1e-3, "language": 1e-3},
            steps=300,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=10,
        ),
        Stage(
            name="finetune",
            train=("vision", "connector", "language"),
            lr={"vision": 3e-4, "connector": 2e-3, "language": 2e-3},
            steps=900,
            batch_size=32,
            warmup_steps=30,
        ),
    ]
    return Preset(
        "mini-gemini-tiny",
        config,
        lambda: world_tokenizer(
            "llava-v1", extra_texts=(LLAVA_V1_SYSTEM, "USER: ASSISTANT:"), extra_tasks=("detail",)
        ),
        recipe,
        description="Mini-Gemini structure at CPU scale (ViT queries mining ConvNeXt windows)",
    )
