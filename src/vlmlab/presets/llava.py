"""LLaVA (Liu et al., 2023) and LLaVA-1.5 (Liu et al., 2023b): a CLIP ViT-L/14 tower (penultimate layer, CLS
dropped), a projector, and a Vicuna/Llama decoder, trained in two stages (SYSTEMS.md §3, §4;
haotian-liu/LLaVA ``scripts/v1_5/pretrain.sh`` and ``finetune.sh``).

The real-scale presets take the decoder (and its tokenizer) from a local directory:
``dataclasses.replace(preset.config.language, pretrained=DIR)``; their numbers are the papers'. ``llava-1.5-tiny``
has the same structure at CPU scale and trains on the embedded world.
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
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.processing.templates import LLAVA_V1_SYSTEM
from vlmlab.training.stages import Stage

IMAGE_TOKEN = "<image>"

# openai/clip-vit-large-patch14(-336) vision tower.
CLIP_VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# Vicuna-7B (Llama-2-7B architecture).
VICUNA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _pretrained_tokenizer(config: ModelConfig, video: bool = False, template: str | None = "llava-v1"):
    """The decoder's own tokenizer with the image (and video) placeholder added, rendering with ``template``
    (``None``: the tokenizer's own chat template, e.g. Qwen's ChatML)."""
    return pretrained_tokenizer(config, (IMAGE_TOKEN, *(("<video>",) if video else ())), template=template)


def _real_scale(name: str, image_size: int, connector: str, pad_to_square: bool) -> ModelConfig:
    """CLIP ViT-L/14 (penultimate layer, CLS dropped) -> ``connector`` -> Vicuna-7B."""
    return ModelConfig(
        vision=VisionConfig(
            name="clip",
            image_size=image_size,
            select_layer=-2,
            select_feature="patch",
            params=dict(CLIP_VIT_L14),
        ),
        connector=ConnectorConfig(name=connector),
        language=LanguageConfig(model_type="llama", params=dict(VICUNA_7B)),
        processor=ProcessorConfig(
            image_size=image_size,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            pad_to_square=pad_to_square,
            resize="shortest_edge_crop",
            max_length=2048,
        ),
        preset=name,
    )


def _two_stages(align: dict, instruct: dict, names: tuple[str, str] = ("align", "instruct")) -> list[Stage]:
    """LLaVA's recipe: align trains the projector only; instruct trains projector + LLM, the tower frozen."""
    return [
        Stage(name=names[0], train=("connector",), **align),
        Stage(name=names[1], train=("connector", "language"), **instruct),
    ]


def llava() -> Preset:
    """LLaVA: ViT-L/14 at 224 (256 tokens), one Linear projector, the v1 template."""
    config = _real_scale("llava", image_size=224, connector="linear", pad_to_square=False)
    recipe = _two_stages(
        # Feature alignment (CC3M-595K).
        align={"lr": {"connector": 2e-3}, "steps": 2326, "batch_size": 128, "warmup_steps": 70},
        # Visual instruction tuning (LLaVA-Instruct-158K).
        instruct={
            "lr": {"connector": 2e-5, "language": 2e-5},
            "steps": 3700,
            "batch_size": 32,
            "warmup_steps": 111,
        },
    )
    return Preset(
        "llava", config, _pretrained_tokenizer(config), recipe, description="LLaVA (CLIP-L/14 + linear)"
    )


def llava_1_5() -> Preset:
    """LLaVA-1.5: ViT-L/14 at 336 (576 tokens), mlp2x_gelu, pad to square with the mean colour, v1 template."""
    config = _real_scale("llava-1.5", image_size=336, connector="mlp2x_gelu", pad_to_square=True)
    recipe = _two_stages(
        # LCS-558K, 1 epoch at batch 256.
        align={"lr": {"connector": 1e-3}, "steps": 2180, "batch_size": 256, "warmup_steps": 65},
        # mix665k, 1 epoch at batch 128.
        instruct={
            "lr": {"connector": 2e-5, "language": 2e-5},
            "steps": 5198,
            "batch_size": 128,
            "warmup_steps": 156,
        },
    )
    return Preset(
        "llava-1.5",
        config,
        _pretrained_tokenizer(config),
        recipe,
        description="LLaVA-1.5 (CLIP-L/14-336 + mlp2x_gelu)",
    )


def llava_1_5_tiny() -> Preset:
    """LLaVA-1.5's structure at CPU scale: a 2-layer CLIP at 64 px (64 tokens), mlp2x_gelu, pad to square, the
    v1 template on a BPE tokenizer trained on the embedded world."""
    from vlmlab.presets.tiny import TINY_LLAMA, world_tokenizer

    config = ModelConfig(
        vision=VisionConfig(
            name="clip",
            image_size=64,
            select_layer=-2,
            select_feature="patch",
            params={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "patch_size": 8,
            },
        ),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(
            model_type="llama",
            params=dict(TINY_LLAMA),
        ),
        processor=ProcessorConfig(
            image_size=64,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            pad_to_square=True,
            resize="shortest_edge_crop",
            max_length=256,
        ),
        preset="llava-1.5-tiny",
    )
    recipe = _two_stages(
        align={
            "lr": {"connector": 1e-3},
            "steps": 300,
            "tasks": ("caption",),
            "batch_size": 32,
            "warmup_steps": 10,
        },
        instruct={
            "lr": {"connector": 2e-3, "language": 2e-3},
            "steps": 900,
            "batch_size": 32,
            "warmup_steps": 30,
        },
    )
    return Preset(
        "llava-1.5-tiny",
        config,
        lambda: world_tokenizer("llava-v1", extra_texts=(LLAVA_V1_SYSTEM, "USER: ASSISTANT:")),
        recipe,
        description="LLaVA-1.5 structure at CPU scale (embedded world)",
    )
