"""Fuyu-8B (Adept, 2023; SYSTEMS.md §7): no image encoder. Images keep their size (resized, aspect kept, only when
larger than 1080 x 1920), are cut into 30 x 30 patches row-major, and each patch, flattened channels-last
(2,700 values), is projected by one Linear (``vision_embed_tokens``) into a Persimmon-8B decoder; a ``|NEWLINE|``
text token ends each row of patches. vlmlab parts: the weightless ``fuyu_patches`` tower (one view per patch), the
``linear`` connector and the ``fuyu`` tiler (``models/tiling/fuyu.py``). Reference: transformers
``models/fuyu/`` (``FuyuForCausalLM`` loads and exports through ``interop/hf/fuyu.py``).

- ``fuyu``: the paper's numbers; the decoder and its tokenizer come from a local directory
  (``language.pretrained``), or the whole model from a Fuyu checkpoint with ``vlmlab.load(dir)``. Adept did not
  publish a training recipe: the one stage here (connector + decoder, LLaVA-1.5's fine-tuning rate) is vlmlab's.
- ``fuyu-tiny``: the same structure at CPU scale on the embedded world: 8-px patches of images up to 64 x 64
  (at most 8 x 8 patches + 8 newlines), the small Llama, trained from scratch (the linear patch projection and the
  decoder learn together, as in Fuyu).
"""

from __future__ import annotations

from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.models.tiling.fuyu import NEWLINE
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.training.stages import Stage

IMAGE_TOKEN = "|SPEAKER|"  # Fuyu's image placeholder, a token of its (Persimmon's) vocabulary
MEAN = STD = (0.5, 0.5, 0.5)
# adept/persimmon-8b-base as Fuyu-8B's config.json gives it: 36 layers of width 4096 (64 heads of 64), a squared-ReLU
# MLP of 16384, LayerNorm on queries and keys, RoPE on half of each head (theta 25,000), untied 262,144-token head.
PERSIMMON_8B = {
    "vocab_size": 262144,
    "hidden_size": 4096,
    "intermediate_size": 16384,
    "num_hidden_layers": 36,
    "num_attention_heads": 64,
    "hidden_act": "relu2",
    "max_position_embeddings": 16384,
    "layer_norm_eps": 1e-5,
    "qk_layernorm": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PATCH = 30
MAX_HEIGHT, MAX_WIDTH = 1080, 1920
TINY_PATCH, TINY_MAX = 8, 64


def _config(
    name: str, patch: int, max_side: tuple[int, int], language: LanguageConfig, **processor
) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name="fuyu_patches", image_size=patch),
        connector=ConnectorConfig(name="linear"),
        language=language,
        processor=ProcessorConfig(
            image_size=patch,
            image_mean=MEAN,
            image_std=STD,
            resize="squash",  # the views are patches already: left as they are
            tiler="fuyu",
            tiler_params={
                "max_height": max_side[0],
                "max_width": max_side[1],
                "newline": NEWLINE,
                "pad_value": 1,
            },
            **processor,
        ),
        preset=name,
    )


def fuyu() -> Preset:
    """Fuyu-8B: 30-px patches (2,700 values -> 4,096), images up to 1080 x 1920 (36 x 64 patches + 36 newlines),
    Persimmon-8B."""
    config = _config(
        "fuyu",
        PATCH,
        (MAX_HEIGHT, MAX_WIDTH),
        LanguageConfig(model_type="persimmon", params=dict(PERSIMMON_8B)),
        image_token=IMAGE_TOKEN,
        max_length=16384,
    )
    recipe = [
        # Not Adept's (undisclosed): everything trains (there is no tower), at LLaVA-1.5's fine-tuning rate.
        Stage(
            name="finetune",
            train=("connector", "language"),
            lr={"connector": 2e-5, "language": 2e-5},
            steps=5000,
            batch_size=128,
            warmup_steps=150,
        ),
    ]
    return Preset(
        "fuyu",
        config,
        pretrained_tokenizer(config, (IMAGE_TOKEN, NEWLINE)),
        recipe,
        description="Fuyu-8B (30-px patches -> linear -> Persimmon-8B, no image encoder)",
    )


def fuyu_tiny() -> Preset:
    """Fuyu's structure at CPU scale: 8-px patches of images up to 64 x 64 (192 values -> 128), the small Llama;
    captions first, then the whole mix, everything trained (the decoder is random)."""
    from vlmlab.presets.tiny import TINY_LLAMA, world_tokenizer

    config = _config(
        "fuyu-tiny",
        TINY_PATCH,
        (TINY_MAX, TINY_MAX),
        LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        max_length=256,
    )
    lr = {"connector": 2e-3, "language": 2e-3}
    recipe = [
        Stage(
            name="align",
            train=("connector", "language"),
            lr=lr,
            steps=150,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=15,
        ),
        Stage(
            name="finetune", train=("connector", "language"), lr=lr, steps=550, batch_size=32, warmup_steps=30
        ),
    ]
    return Preset(
        "fuyu-tiny",
        config,
        lambda: world_tokenizer(extra_special_tokens=(NEWLINE,)),
        recipe,
        description="Fuyu structure at CPU scale (8-px patches -> linear -> small Llama, no image encoder)",
    )
