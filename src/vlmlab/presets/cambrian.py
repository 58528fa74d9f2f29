"""Cambrian-1 (SYSTEMS.md §20; cambrian-mllm/cambrian ``scripts/cambrian/{pretrain,finetune}_cambrian_8b.sh``):
four towers read by the Spatial Vision Aggregator (``connectors/sva.py``), and the image rows re-reading the towers
inside the decoder (``fusion.regional``, ``models/fusion/sva.py``).

- ``cambrian``: Cambrian-1-8B's layout. Towers, in the script's order (tower 0 gives the global context), each
  resized to the script's token grid (``vision_tower_aux_token_len_list`` 576, 576, 576, 9216):

  - SigLIP-SO400M/14 at 384 (27 x 27 -> 24 x 24), its own normalisation (0.5);
  - OpenAI CLIP ViT-L/14 at 336 (24 x 24, layer -2);
  - DINOv2-giant/14 at 378 (27 x 27 -> 24 x 24), ImageNet normalisation. The script's ``dinov2-giant-res378``;
    the paper's encoder study names DINOv2 ViT-L/14 at 518. As a CLIP-shaped tower of its size (width 1536, 40
    layers, 24 heads, MLP 6144: DINOv2's SwiGLU of 2 x 4096 has the same parameter count); DINOv2's own blocks
    (layer scale, SwiGLU) and final LayerNorm are not represented;
  - OpenCLIP ConvNeXt-XXL at 1024, multi-stage (384 + 768 + 1536 + 3072 = 5760 channels; ``encoders/convnext.py``:
    every stage on stage 0's 256 x 256 grid, then resized to 96 x 96 by the SVA, where the reference resizes
    each stage to 96 x 96 directly).

  SVA: 24 x 24 = 576 queries, width 1024, 3 layers, 16 heads, a newline after each row (600 tokens); inside
  the Llama-3-8B-shaped decoder, one aggregation layer after layers 0, 3, ..., 27 (start 0, stride 3, 10 layers).
  Images padded to square (``image_aspect_ratio pad``); the processor's view is 1024 px (the largest tower's).
  Recipe: stage 1 trains the SVA and the in-decoder layers on 2.5M alignment samples (lr 1e-3; the reference's
  ``mm_vision_sampler_lr`` 1e-4 for its sampler layers and query, here the in-decoder layers, since a stage's
  learning rate is per part), stage 2 adds the LLM on Cambrian-7M (lr 4e-5); the towers stay frozen.
- ``cambrian-tiny``: the same design at CPU scale: two ConvNet towers at 32 and 64 px (4 x 4 and 8 x 8 grids),
  G = 4 (16 queries + 4 newlines), in-decoder layers after layers 0 and 2 of the small Llama. The world's LLM and
  towers are random, so an ``llm`` stage stands in for the pretrained LLM and the towers train in stage 1.
"""

from __future__ import annotations

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    RegionalConfig,
    VisionConfig,
)
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.presets.fusion import frozen_llm_recipe
from vlmlab.presets.internvl import IMAGENET_MEAN, IMAGENET_STD, LLAMA3_8B, SIGLIP_SO400M_384
from vlmlab.presets.llava import CLIP_VIT_L14
from vlmlab.training.stages import Stage

# facebook/dinov2-giant as a CLIP-shaped tower (see the module docstring).
DINOV2_GIANT14 = {
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 40,
    "num_attention_heads": 24,
    "patch_size": 14,
    "hidden_act": "gelu",
}
# laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup's trunk (timm ``convnext_xxlarge``).
CONVNEXT_XXL = {"hidden_sizes": [384, 768, 1536, 3072], "depths": [3, 4, 30, 3]}
QUERY_GRID = 24  # 576 queries
SAMPLER_LAYERS = list(range(0, 30, 3))  # start 0, stride 3, 10 layers


def regional_fusion(layers: list[int]) -> FusionConfig:
    """The in-decoder re-aggregation alone (no routed layers, no cross-attention)."""
    return FusionConfig(mode=None, regional=RegionalConfig(layers=list(layers)))


def cambrian() -> Preset:
    """Cambrian-1-8B: SigLIP + CLIP-L + DINOv2-g + ConvNeXt-XXL -> SVA (576 queries) -> Llama-3-8B with
    aggregation layers after every 3rd of its first 30 layers."""
    siglip = VisionConfig(
        name="siglip",
        image_size=384,
        select_layer=-1,
        params=dict(SIGLIP_SO400M_384),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    clip = VisionConfig(name="clip", image_size=336, select_layer=-2, params=dict(CLIP_VIT_L14))
    dino = VisionConfig(
        name="clip",
        image_size=378,
        select_layer=-1,
        params=dict(DINOV2_GIANT14),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    convnext = VisionConfig(name="convnext", image_size=1024, params=dict(CONVNEXT_XXL))
    config = ModelConfig(
        vision=siglip,
        extra_vision=[clip, dino, convnext],
        connector=ConnectorConfig(
            name="sva",
            params={
                "grid": QUERY_GRID,
                "grids": [24, 24, 24, 96],
                "dim": 1024,
                "depth": 3,
                "heads": 16,
                "newline": True,
            },
        ),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA3_8B)),
        processor=ProcessorConfig(
            image_size=1024, image_mean=CLIP_MEAN, image_std=CLIP_STD, pad_to_square=True, max_length=2048
        ),
        fusion=regional_fusion(SAMPLER_LAYERS),
        preset="cambrian",
    )
    note = {
        "source": "cambrian-mllm/cambrian scripts/cambrian/*_cambrian_8b.sh",
        "batch_size": "512 assumed (verify)",
    }
    recipe = [
        Stage(
            name="pretrain",
            train=("connector", "fusion"),
            lr={"connector": 1e-3, "fusion": 1e-4},
            steps=4883,  # 2.5M alignment samples, one epoch
            batch_size=512,
            warmup_steps=293,  # warmup ratio 0.06, cosine
            extra={**note, "data": "Cambrian alignment 2.5M"},
        ),
        Stage(
            name="finetune",
            train=("connector", "fusion", "language"),
            lr={"connector": 4e-5, "fusion": 4e-5, "language": 4e-5},
            steps=13672,  # Cambrian-7M, one epoch
            batch_size=512,
            warmup_steps=410,  # warmup ratio 0.03, cosine
            extra={**note, "data": "Cambrian-7M (with system prompts)"},
        ),
    ]
    return Preset(
        "cambrian",
        config,
        pretrained_tokenizer(config),
        recipe,
        description="Cambrian-1-8B (4 towers -> Spatial Vision Aggregator, 576 queries; re-aggregation in the LLM)",
    )


TINY_LR = 2e-3


def cambrian_tiny() -> Preset:
    """Two ConvNet towers at 32 and 64 px, 16 queries (G = 4) and 4 newlines, aggregation after decoder layers 0
    and 2 of the small Llama."""
    from vlmlab.presets.tiny import TINY_LLAMA, world_tokenizer

    def convnet(size: int) -> VisionConfig:  # three stride-2 stages: size / 8 per side, width 96
        return VisionConfig(name="convnet", image_size=size, params={"channels": [32, 64, 96], "pool": 1})

    config = ModelConfig(
        vision=convnet(32),
        extra_vision=[convnet(64)],
        connector=ConnectorConfig(
            name="sva",
            params={"grid": 4, "grids": [4, 8], "dim": 64, "depth": 3, "heads": 4, "newline": True},
        ),
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=256
        ),
        fusion=regional_fusion([0, 2]),
        preset="cambrian-tiny",
    )
    aggregator = ("connector", "fusion")
    recipe = [
        # The llm stand-in, then the paper's stage 1 (LLM frozen; the random towers train too, 10x slower: the
        # tiny presets' lesson).
        *frozen_llm_recipe(700, train=("vision", *aggregator), lr={"vision": 3e-4}),
        # The paper's stage 2: the aggregator and the LLM, the towers frozen.
        Stage(
            name="finetune",
            train=(*aggregator, "language"),
            lr=dict.fromkeys((*aggregator, "language"), 1e-3),
            steps=300,
            batch_size=32,
            warmup_steps=15,
        ),
    ]
    return Preset(
        "cambrian-tiny",
        config,
        lambda: world_tokenizer(),
        recipe,
        description="Cambrian-1's SVA over two towers and its in-LLM re-aggregation at CPU scale",
    )
