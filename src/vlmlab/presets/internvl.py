"""InternVL 1.5 (Chen et al., 2024; SYSTEMS.md §18) and VILA-1.5 (Lin et al., 2024; SYSTEMS.md §10): towers
whose token grids are merged 2 x 2 into the channels before an LN-MLP, at the papers' scale, and their CPU-scale
variants that train on the embedded world.

- ``internvl-1.5``: InternViT-6B-448px-V1.5 (45 layers, last layer, CLS dropped) -> pixel shuffle r = 2 (1024 ->
  256 tokens per 448-px tile) -> ``mlp1`` (LN -> Linear -> GELU -> Linear) -> an InternLM2-20B-shaped decoder
  (Llama architecture); dynamic tiling (1 to 12 tiles + thumbnail); each image is ``<img>`` +
  ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>``. The InternVL-Chat-V1-5 checkpoints were trained with
  ``ps_version='v1'`` (the transposed grid, the repository's default; InternVL 2 switched to v2, transformers' only
  one; verify against the checkpoint's config.json): kept here, so the preset exports to transformers only after
  switching to v2. Recipe (``internvl_chat`` shells'
  ``freeze_backbone/llm/mlp``): stage 1 trains InternViT + MLP with the LLM frozen; stage 2 trains everything.
- ``vila-1.5``: SigLIP-SO400M-384 (penultimate layer; 27 x 27 tokens) -> ``mlp_downsample`` (zero-padded to
  28 x 28, 2 x 2 concat -> 196 tokens, LN -> Linear -> GELU -> Linear) -> a Llama-3-8B-shaped decoder. VILA's three
  stages: projector alignment (projector only), visual-language pretraining on interleaved data with the LLM
  unfrozen (projector + LLM), SFT with text-only instructions blended in (projector + LLM).

Step counts and learning rates marked "(verify)" are the papers' reported settings turned into steps, not read
from code. The real-scale presets take the decoder and its tokenizer from a local directory (``language.pretrained``).
"""

from __future__ import annotations

from vlmlab.config import (
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
)
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.training.stages import Stage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# OpenGVLab/InternViT-6B-448px-V1.5 (48 layers with the last 3 removed), as transformers' InternVLVisionConfig.
INTERNVIT_6B_448_V1_5 = {
    "hidden_size": 3200,
    "intermediate_size": 12800,
    "num_hidden_layers": 45,
    "num_attention_heads": 25,
    "patch_size": 14,
    "use_qk_norm": True,
    "attention_bias": False,
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "layer_scale_init_value": 0.1,
    "use_mean_pooling": True,  # no final norm: the chat model takes the last layer's output as it is
}
# internlm/internlm2-chat-20b's shape as a Llama decoder (InternVL-Chat-V1-5's 92,553-token vocabulary).
INTERNLM2_20B = {
    "vocab_size": 92553,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# google/siglip-so400m-patch14-384 (all 27 layers; VILA selects the penultimate one).
SIGLIP_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
}
# meta-llama/Meta-Llama-3-8B.
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def internvl_1_5() -> Preset:
    """InternVL-Chat-V1-5 (26B): InternViT-6B-448px-V1.5 + pixel shuffle + MLP + InternLM2-20B, up to 12 tiles."""
    config = ModelConfig(
        vision=VisionConfig(
            name="internvit",
            image_size=448,
            select_layer=-1,
            select_feature="patch",
            params=dict(INTERNVIT_6B_448_V1_5),
        ),
        connector=ConnectorConfig(name="pixel_shuffle_mlp", params={"ratio": 2, "ps_version": "v1"}),
        language=LanguageConfig(model_type="llama", params=dict(INTERNLM2_20B)),
        processor=ProcessorConfig(
            image_size=448,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            resize="squash",
            image_token=IMG_CONTEXT,
            tiler="dynamic",
            tiler_params={"min_tiles": 1, "max_tiles": 12, "thumbnail": True},
            image_start=IMG_START,
            image_end=IMG_END,
            max_length=4096,
        ),
        preset="internvl-1.5",
    )
    recipe = [
        # Pretraining: InternViT-6B + MLP on captions/OCR data, the LLM frozen (lr 2e-4, batch 1024; verify).
        Stage(
            name="pretrain",
            train=("vision", "connector"),
            lr={"vision": 2e-4, "connector": 2e-4},
            steps=5000,
            batch_size=1024,
            warmup_steps=150,
            weight_decay=0.05,
        ),
        # Fine-tuning: all 26B parameters on ~5M instruction samples (lr 2e-5, batch 1024; verify).
        Stage(
            name="finetune",
            train=("vision", "connector", "language"),
            lr={"vision": 2e-5, "connector": 2e-5, "language": 2e-5},
            steps=5000,
            batch_size=1024,
            warmup_steps=150,
            weight_decay=0.05,
        ),
    ]
    return Preset(
        "internvl-1.5",
        config,
        pretrained_tokenizer(config, (IMG_START, IMG_END, IMG_CONTEXT)),
        recipe,
        description="InternVL 1.5 (InternViT-6B + pixel shuffle + MLP + InternLM2-20B, dynamic tiles)",
    )


def _vila_recipe(lr: dict, steps: tuple[int, int, int], batch: tuple[int, int, int], **common) -> list[Stage]:
    """VILA: align (projector), pretrain (projector + LLM, interleaved data), SFT (projector + LLM, text blended)."""
    both = ("connector", "language")
    return [
        Stage(
            name="align",
            train=("connector",),
            lr={"connector": lr["align"]},
            steps=steps[0],
            batch_size=batch[0],
            **common.get("align", {}),
        ),
        Stage(
            name="pretrain",
            train=both,
            lr={p: lr["pretrain"] for p in both},
            steps=steps[1],
            batch_size=batch[1],
            **common.get("pretrain", {}),
        ),
        Stage(
            name="sft",
            train=both,
            lr={p: lr["sft"] for p in both},
            steps=steps[2],
            batch_size=batch[2],
            **common.get("sft", {}),
        ),
    ]


def vila_1_5() -> Preset:
    """VILA1.5-8B: SigLIP-SO400M-384 (penultimate layer) + mlp_downsample (196 tokens) + Llama-3-8B."""
    config = ModelConfig(
        vision=VisionConfig(
            name="siglip",
            image_size=384,
            select_layer=-2,
            select_feature="patch",
            params=dict(SIGLIP_SO400M_384),
        ),
        connector=ConnectorConfig(name="mlp_downsample", params={"ps_version": "v1"}),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA3_8B)),
        processor=ProcessorConfig(
            image_size=384,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            resize="squash",
            max_length=4096,
        ),
        preset="vila-1.5",
    )
    # LLaVA-CC3M-595K at batch 256; MMC4 + COYO at batch 1024; SFT at batch 128 (lr from the VILA scripts; verify).
    recipe = _vila_recipe(
        lr={"align": 1e-3, "pretrain": 5e-5, "sft": 2e-5},
        steps=(2326, 25000, 7000),
        batch=(256, 1024, 128),
        align={"warmup_steps": 70},
        pretrain={"warmup_steps": 750},
        sft={"warmup_steps": 210},
    )
    return Preset(
        "vila-1.5",
        config,
        pretrained_tokenizer(config, ("<image>",)),
        recipe,
        description="VILA-1.5 (SigLIP-SO400M + mlp_downsample + Llama-3-8B)",
    )


# -- CPU scale: the same structures on the embedded world ----------------------------------------------------
TINY_SIDE = (
    64  # pixels per tile (InternVL) or image (VILA); 8-px patches -> 64 tokens -> 16 after the 2 x 2 merge
)


def _tiny_tower(name: str, side: int = TINY_SIDE) -> VisionConfig:
    """A 2-layer ViT of 8-px patches, from scratch (InternVL: last layer; VILA: penultimate)."""
    params = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    return VisionConfig(
        name=name,
        image_size=side,
        select_layer=-1 if name == "internvit" else -2,
        select_feature="patch",
        params={**params, "patch_size": 8},
    )


def _tiny_lm() -> LanguageConfig:
    from vlmlab.presets.tiny import TINY_LLAMA

    return LanguageConfig(model_type="llama", params=dict(TINY_LLAMA))


def internvl_1_5_tiny() -> Preset:
    """InternVL 1.5's structure at CPU scale: a 2-layer InternViT on 64-px tiles (64 tokens -> 16 after the pixel
    shuffle), dynamic tiling up to 4 tiles + thumbnail, ``<img>``/``</img>`` around each image, the small Llama;
    stage 1 trains tower + MLP with the LLM frozen (at the world's scale the LLM must then learn the language
    alone in stage 2), stage 2 trains everything. v2 shuffle, so it exports to transformers' ``internvl``.
    Measured (1 thread, world of 1,500 records per task + 3,000 captions, 50 test records per task): 180 s of
    training; accuracy vs blind: colour 66 / 16, count 42 / 24, position 40 / 20, shape 44 / 26."""
    from vlmlab.presets.tiny import world_tokenizer

    config = ModelConfig(
        vision=_tiny_tower("internvit"),
        connector=ConnectorConfig(name="pixel_shuffle_mlp", params={"ratio": 2, "ps_version": "v2"}),
        language=_tiny_lm(),
        processor=ProcessorConfig(
            image_size=TINY_SIDE,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            resize="squash",
            tiler="dynamic",
            tiler_params={"min_tiles": 1, "max_tiles": 4, "thumbnail": True},
            image_start=IMG_START,
            image_end=IMG_END,
            max_length=256,
        ),
        preset="internvl-1.5-tiny",
    )
    lr = {"vision": 1e-3, "connector": 2e-3, "language": 2e-3}
    recipe = [
        # Stage 1 (captions): tower + MLP learn to feed the frozen LLM.
        Stage(
            name="pretrain",
            train=("vision", "connector"),
            lr={"vision": lr["vision"], "connector": lr["connector"]},
            steps=100,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=10,
        ),
        # Stage 2: everything on the whole mix.
        Stage(
            name="finetune",
            train=("vision", "connector", "language"),
            lr=lr,
            steps=550,
            batch_size=32,
            warmup_steps=30,
        ),
    ]
    return Preset(
        "internvl-1.5-tiny",
        config,
        lambda: world_tokenizer(extra_special_tokens=(IMG_START, IMG_END)),
        recipe,
        description="InternVL 1.5 structure at CPU scale (pixel shuffle + dynamic 64-px tiles)",
    )


def vila_1_5_tiny() -> Preset:
    """VILA-1.5's structure at CPU scale: a 2-layer SigLIP at 72 px (9 x 9 = 81 tokens, an odd grid: padded to
    10 x 10 -> 25 tokens), ``mlp_downsample``, the small Llama, VILA's three stages. As in VILA the tower never
    trains, so here its features are those of a random ViT: the stages teach the projector and the LLM to read them.
    Measured (as ``internvl-1.5-tiny``): 150 s of training; accuracy vs blind: colour 100 / 4, count 64 / 10,
    position 42 / 0, shape 48 / 6."""
    from vlmlab.presets.tiny import world_tokenizer

    config = ModelConfig(
        vision=_tiny_tower("siglip", side=72),
        connector=ConnectorConfig(name="mlp_downsample", params={"ps_version": "v1"}),
        language=_tiny_lm(),
        processor=ProcessorConfig(
            image_size=72,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            resize="squash",
            max_length=256,
        ),
        preset="vila-1.5-tiny",
    )
    recipe = _vila_recipe(
        lr={"align": 2e-3, "pretrain": 2e-3, "sft": 1e-3},
        steps=(100, 600, 300),
        batch=(32, 32, 32),
        align={"warmup_steps": 10, "tasks": ("caption",)},
        pretrain={"warmup_steps": 10},
        sft={"warmup_steps": 10},
    )
    return Preset(
        "vila-1.5-tiny",
        config,
        world_tokenizer,
        recipe,
        description="VILA-1.5 structure at CPU scale (SigLIP + mlp_downsample, odd grid padded)",
    )
