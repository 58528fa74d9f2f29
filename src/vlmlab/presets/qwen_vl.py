"""Qwen-VL (Bai et al., 2023) and MiniCPM-V 2.0 (Yao et al., 2024) at the papers' scale (SYSTEMS.md §5, §19),
and their CPU-scale variants that train on the embedded world.

- ``qwen-vl``: ViT-bigG/14 at 448 (32 x 32 = 1024 patch tokens, width 1664) -> the position-aware adapter
  (``qwen_vl_adapter``: 256 learned queries, one cross-attention, fixed 2D sin-cos positions) -> a Qwen-7B-shaped
  decoder (``qwen2`` model type: same layout, biases on q/k/v). Each image is ``Picture k: <img>`` + 256 rows +
  ``</img>``; grounding answers are ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` in 0..999 coordinates.
  Recipe (paper; verify): S1 pretraining at 224 (256 -> 256 tokens) with the LLM frozen, the ViT and the adapter
  trained; S2 multi-task at 448 with everything trained; S3 SFT with the ViT frozen.
- ``minicpm-v``: SigLIP-SO400M/14 at 448 (the last layer dropped, as MiniCPM-V's ``drop_vision_last_layer``) ->
  ``minicpm_resampler`` (64 queries, key positions recomputed per slice grid) -> a MiniCPM-2.4B-shaped decoder
  (``llama`` layout: MiniCPM's muP embedding/residual scales are not represented). LLaVA-UHD slicing (``uhd``
  tiler, up to 9 slices of about 448^2 plus the source view). Recipe (paper; verify): three pretraining phases
  with the LLM frozen (resampler alone at 224; + ViT at 448; + slicing), then SFT of every parameter.

The real-scale presets take the decoder and tokenizer from a local directory (``language.pretrained``).

The ``-tiny`` variants keep the structures (adapter / resampler, ``<img>`` wrapping, ``Picture k:`` labels, UHD
slicing and MiniCPM-V's view layout) with a from-scratch ConvNet tower (it learns shapes within CPU minutes) and
the small Llama. Their decoder is random, so it cannot stay frozen as the papers' pretrained LLM does: every
tiny stage trains it (the stage names and the parts the papers freeze otherwise follow the recipes).
``qwen-vl-tiny`` trains on the ``ground`` task too: build its world with ``build_world(...,
extra_tasks=("ground",))``.
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
from vlmlab.training.stages import Stage

IMAGE_TOKEN = "<image>"
IMG_START, IMG_END = "<img>", "</img>"
PICTURE_LABEL = "Picture {k}: "
GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
# MiniCPM-V's view markers (its tokenizer's im_start / im_end / slice_start / slice_end).
MINICPM_MARKERS = ("<im_start>", "<im_end>", "<slice>", "</slice>")

# OpenCLIP ViT-bigG/14 as Qwen-VL uses it (width 1664, 48 layers, 16 heads, MLP 8192), at 448 px.
VIT_BIGG_14 = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}
# Qwen-7B (v1): 32 layers of width 4096, SwiGLU 11008, q/k/v biases, untied head, 151,936 tokens.
QWEN_7B = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# google/siglip-so400m-patch14-384's tower, its last layer dropped (MiniCPM-V 2.0), run at 448 px (32 x 32).
SIGLIP_SO400M_MINICPM = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "patch_size": 14,
}
# MiniCPM-2.4B: 40 layers of width 2304 (36 heads of 64), SwiGLU 5760, tied embedding, 122,753 tokens.
MINICPM_2B = {
    "vocab_size": 122753,
    "hidden_size": 2304,
    "intermediate_size": 5760,
    "num_hidden_layers": 40,
    "num_attention_heads": 36,
    "num_key_value_heads": 36,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
EVERYTHING = ("vision", "connector", "language")


def _pretrained_tokenizer(config: ModelConfig, special: tuple[str, ...], plain: tuple[str, ...] = ()):
    """The decoder's own tokenizer (and chat template) with the placeholder and ``special`` markers added as
    special tokens, and ``plain`` ones (the grounding tags) as ordinary added tokens."""
    return pretrained_tokenizer(config, (IMAGE_TOKEN, *special), plain)


# -- Qwen-VL ---------------------------------------------------------------------------------------------------
def qwen_vl() -> Preset:
    """Qwen-VL: ViT-bigG/14-448 (1024 tokens) -> adapter (256 queries, 32 heads) -> Qwen-7B-shaped decoder."""
    config = ModelConfig(
        vision=VisionConfig(
            name="clip", image_size=448, select_layer=-1, select_feature="patch", params=dict(VIT_BIGG_14)
        ),
        connector=ConnectorConfig(name="qwen_vl_adapter", params={"num_queries": 256}),
        language=LanguageConfig(model_type="qwen2", params=dict(QWEN_7B)),
        processor=ProcessorConfig(
            image_size=448,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            resize="squash",
            max_length=2048,
            image_start=IMG_START,
            image_end=IMG_END,
            image_label=PICTURE_LABEL,
        ),
        preset="qwen-vl",
    )
    recipe = [
        # 1.4B image-text pairs at 224 (the adapter sees 16 x 16 = 256 patch tokens there).
        Stage(
            name="pretrain",
            train=("vision", "connector"),
            lr={"vision": 2e-4, "connector": 2e-4},
            steps=50000,
            batch_size=30720,
            warmup_steps=500,
            weight_decay=0.05,
            betas=(0.9, 0.98),
            extra={"image_size": 224, "source": "Qwen-VL paper, Table 8 (verify)"},
        ),
        # Seven interleaved tasks (captioning, VQA, grounding, OCR...) at 448.
        Stage(
            name="multitask",
            train=EVERYTHING,
            lr=dict.fromkeys(EVERYTHING, 5e-5),
            steps=19000,
            batch_size=4096,
            warmup_steps=400,
            weight_decay=0.05,
            betas=(0.9, 0.98),
            extra={"image_size": 448, "source": "Qwen-VL paper, Table 8 (verify)"},
        ),
        # Qwen-VL-Chat: instruction tuning with the ViT frozen.
        Stage(
            name="sft",
            train=("connector", "language"),
            lr={"connector": 1e-5, "language": 1e-5},
            steps=8000,
            batch_size=128,
            warmup_steps=3000,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            extra={"source": "Qwen-VL paper, Table 8 (verify)"},
        ),
    ]
    return Preset(
        "qwen-vl",
        config,
        _pretrained_tokenizer(config, (IMG_START, IMG_END), GROUNDING_TAGS),
        recipe,
        description="Qwen-VL (ViT-bigG/14-448 + position-aware adapter, 256 queries)",
    )


# -- MiniCPM-V 2.0 -----------------------------------------------------------------------------------------------
def minicpm_v() -> Preset:
    """MiniCPM-V 2.0: SigLIP-SO400M/14-448 -> resampler (64 queries, 18 heads) per view, UHD slicing (up to 9
    slices + source), MiniCPM-2.4B-shaped decoder."""
    config = ModelConfig(
        vision=VisionConfig(
            name="siglip",
            image_size=448,
            select_layer=-1,
            select_feature="patch",
            params=dict(SIGLIP_SO400M_MINICPM),
        ),
        connector=ConnectorConfig(name="minicpm_resampler", params={"num_queries": 64}),
        language=LanguageConfig(model_type="llama", params=dict(MINICPM_2B)),
        processor=ProcessorConfig(
            image_size=448,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            resize="squash",
            max_length=2048,
            tiler="uhd",
            tiler_params={"max_slices": 9, "scale": 448, "patch": 14},
        ),
        preset="minicpm-v",
    )
    pretrain_note = {"source": "MiniCPM-V paper, section 4 (verify)"}
    recipe = [
        Stage(
            name="pretrain-resampler",
            train=("connector",),
            lr={"connector": 1e-3},
            steps=10000,
            batch_size=256,
            extra={**pretrain_note, "image_size": 224, "slicing": False},
        ),
        Stage(
            name="pretrain-vision",
            train=("vision", "connector"),
            lr={"vision": 1e-4, "connector": 1e-4},
            steps=10000,
            batch_size=256,
            extra={**pretrain_note, "image_size": 448, "slicing": False},
        ),
        Stage(
            name="pretrain-slicing",
            train=("vision", "connector"),
            lr={"vision": 1e-4, "connector": 1e-4},
            steps=10000,
            batch_size=256,
            extra={**pretrain_note, "image_size": 448, "slicing": True},
        ),
        Stage(
            name="sft",
            train=EVERYTHING,
            lr=dict.fromkeys(EVERYTHING, 1e-5),
            steps=5000,
            batch_size=128,
            warmup_steps=100,
            extra=pretrain_note,
        ),
    ]
    return Preset(
        "minicpm-v",
        config,
        _pretrained_tokenizer(config, MINICPM_MARKERS),
        recipe,
        description="MiniCPM-V 2.0 (SigLIP-SO400M + 64-query resampler + LLaVA-UHD slicing)",
    )


# -- CPU scale ---------------------------------------------------------------------------------------------------
TINY_VIEW = 64  # pixels per view: the ConvNet's 3 stride-2 stages give 8 x 8 = 64 tokens
TINY_CHANNELS = [32, 64, 96]  # 96 != the LM's 128, so the adapter's kv_proj is a real projection
TINY_QUERIES = 16  # 4 x 4 queries per view (64 -> 16, as Qwen-VL's 1024 -> 256)
TINY_LR = {"vision": 3e-4, "connector": 2e-3, "language": 2e-3}


def _tiny_config(name: str, connector: str, processor: dict) -> ModelConfig:
    from vlmlab.presets.tiny import TINY_LLAMA

    return ModelConfig(
        vision=VisionConfig(
            name="convnet", image_size=TINY_VIEW, params={"channels": list(TINY_CHANNELS), "pool": 1}
        ),
        connector=ConnectorConfig(name=connector, params={"num_queries": TINY_QUERIES}),
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=TINY_VIEW,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            max_length=256,
            **processor,
        ),
        preset=name,
    )


def _tiny_tokenizer(special: tuple[str, ...], extra_tasks: tuple[str, ...], texts: tuple[str, ...] = ()):
    def make():
        from vlmlab.presets.tiny import world_tokenizer

        return world_tokenizer(extra_texts=texts, extra_special_tokens=special, extra_tasks=extra_tasks)

    return make


def qwen_vl_tiny() -> Preset:
    """Qwen-VL at CPU scale: ConvNet at 64 px (8 x 8 tokens) -> adapter (16 queries) -> small Llama; ``<img>``
    wrapping, ``Picture k:`` labels; the world's default tasks plus ``ground`` (boxes in 0..999 coordinates)."""
    from vlmlab.data.world import TASKS

    config = _tiny_config(
        "qwen-vl-tiny",
        "qwen_vl_adapter",
        {"image_start": IMG_START, "image_end": IMG_END, "image_label": PICTURE_LABEL},
    )
    recipe = [
        # S1 (captions): the tower and the adapter learn; the random decoder must learn too at this scale.
        Stage(
            name="pretrain",
            train=EVERYTHING,
            lr=TINY_LR,
            steps=150,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=15,
        ),
        # S2 multi-task: the questions and grounding, everything trained.
        Stage(
            name="multitask",
            train=EVERYTHING,
            lr=TINY_LR,
            steps=300,
            tasks=(*TASKS, "ground"),
            batch_size=32,
            warmup_steps=20,
        ),
        # S3 SFT: the tower frozen, adapter and decoder trained.
        Stage(
            name="sft",
            train=("connector", "language"),
            lr={"connector": 1e-3, "language": 1e-3},
            steps=150,
            tasks=(*TASKS, "ground"),
            batch_size=32,
            warmup_steps=10,
        ),
    ]
    return Preset(
        "qwen-vl-tiny",
        config,
        _tiny_tokenizer((IMG_START, IMG_END), ("ground",), ("Picture 1:", "Picture 2:", "Picture 3:")),
        recipe,
        description="Qwen-VL structure at CPU scale (adapter with fixed sin-cos positions, grounding)",
    )


def minicpm_v_tiny() -> Preset:
    """MiniCPM-V 2.0 at CPU scale: UHD slicing (about 64^2-pixel slices, up to 4, plus the source; each view
    64 px) -> ConvNet -> resampler (16 queries per view) -> small Llama, with MiniCPM-V's view layout."""
    config = _tiny_config(
        "minicpm-v-tiny",
        "minicpm_resampler",
        {"tiler": "uhd", "tiler_params": {"max_slices": 4, "scale": TINY_VIEW, "patch": 8}},
    )
    recipe = [
        # The papers' pretraining freezes the LLM; the random tiny decoder trains from the start.
        Stage(
            name="pretrain",
            train=EVERYTHING,
            lr=TINY_LR,
            steps=150,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=15,
        ),
        Stage(name="sft", train=EVERYTHING, lr=TINY_LR, steps=300, batch_size=32, warmup_steps=20),
    ]
    return Preset(
        "minicpm-v-tiny",
        config,
        _tiny_tokenizer(MINICPM_MARKERS, ()),
        recipe,
        description="MiniCPM-V 2.0 structure at CPU scale (UHD slicing + per-view resampler)",
    )
