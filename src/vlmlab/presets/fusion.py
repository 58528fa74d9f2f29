"""Deep-fusion systems (SYSTEMS.md §8, §9, §14, §21): the image changes the decoder itself, not only its input.

- ``cogvlm``: EVA2-CLIP-E-shaped tower at 490/14 (1225 tokens, final layer dropped) -> CogVLM's GLU adapter ->
  a Vicuna-7B-shaped decoder with a **visual expert** in every layer (a copy of each projection for image rows)
  and **shared image positions**. CogVLM's learned boi/eoi embeddings are not represented (the image rows are the
  placeholders alone). Recipe (paper; verify): two pretraining stages (captions; captions + REC) training the
  expert and the adapter with the ViT and the LLM frozen, then SFT.
- ``cogagent``: CogVLM at 224 (256 tokens) plus the **high-resolution branch**: an EVA2-CLIP-L-shaped tower at
  1120/14 (6400 tokens, width 1024) that every decoder layer cross-attends to after self-attention (32 heads of 32,
  ungated, K/V computed once). Pretraining trains the cross module and the expert, the LLM and low-res ViT frozen.
- ``xcomposer2``: CLIP ViT-L/14 at 490 (1225 tokens) -> mlp2x_gelu -> an InternLM2-7B-shaped decoder with
  **Partial LoRA** (r = alpha = 256) on every projection for image rows. Pretraining trains the ViT, the PLoRA and
  the projector with the LLM frozen; SFT trains everything (paper; verify).
- ``flamingo``: CLIP ViT-L/14 (OpenFlamingo) -> Perceiver Resampler (64 latents, depth 6, 8 x 64) -> **gated
  cross-attention** (LayerNorm, GELU FF x4, tanh gates at 0) in front of every 4th layer ((i + 1) % 4 == 0,
  OpenFlamingo's placement) of a frozen 7B decoder; ``<image>`` is one text token, ``<|endofchunk|>`` ends a
  chunk. Trained: the perceiver and the blocks.
- ``mllama``: Llama-3.2-11B-Vision's layout on a Llama-3.1-8B-shaped decoder: gated blocks in front of layers
  3, 7, 11, ... (transformers' ``cross_attention_layers`` 3, 8, 13, ... counted with the cross layers), RMSNorm,
  SwiGLU, q/k head norms, GQA, adjacent images grouped, Mllama's rule for text before the first image.

The real-scale presets take the decoder and tokenizer from a local directory (``language.pretrained``).

The ``-tiny`` variants train on the embedded world with a from-scratch ConvNet tower and the small Llama. These
designs keep a *pretrained* LLM frozen, and the world's LLM is random, so each tiny recipe starts with an
``llm`` stage that trains the decoder alone (the stand-in for the pretrained LLM: with the fusion weights
untouched the model reads the images poorly, so this stage learns the language of the answers), then runs the
paper's stages with the LLM frozen; the tiny tower is random too, so it trains where the papers freeze theirs.
Text-only input never reaches the fusion weights, so after the ``llm`` stage the model's text ability is fixed
(``scripts/fusion.py`` measures it).
"""

from __future__ import annotations

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    CrossAttentionConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
)
from vlmlab.presets.base import Preset, pretrained_tokenizer
from vlmlab.presets.blip2 import INTERNLM_7B
from vlmlab.presets.internvl import LLAMA3_8B
from vlmlab.presets.llava import CLIP_VIT_L14, VICUNA_7B
from vlmlab.training.stages import Stage

# EVA2-CLIP-E/14 (CogVLM's tower; width 1792, 63 layers used of 64, MLP 15360), EVA2-CLIP-L/14 (CogAgent's
# high-resolution tower, width 1024, 24 layers). As plain CLIP towers: EVA's own blocks are not represented.
EVA2_CLIP_E14 = {
    "hidden_size": 1792,
    "intermediate_size": 15360,
    "num_hidden_layers": 63,
    "num_attention_heads": 16,
    "patch_size": 14,
    "hidden_act": "gelu",
}
EVA2_CLIP_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "hidden_act": "gelu",
}
INTERNLM2_7B = {
    **INTERNLM_7B,
    "vocab_size": 92544,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
ENDOFCHUNK = "<|endofchunk|>"
ALL_ROUTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _clip(image_size: int, params: dict, select_layer: int = -2) -> VisionConfig:
    return VisionConfig(
        name="clip",
        image_size=image_size,
        select_layer=select_layer,
        select_feature="patch",
        params=dict(params),
    )


def _processor(image_size: int, **kw) -> ProcessorConfig:
    return ProcessorConfig(
        image_size=image_size,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resize="squash",
        max_length=2048,
        **kw,
    )


def cogvlm_fusion(cross: CrossAttentionConfig | None = None) -> FusionConfig:
    """CogVLM's visual expert in every projection of every layer."""
    return FusionConfig(mode="expert", targets=list(ALL_ROUTED), cross=cross)


def cogagent_cross(vision: VisionConfig, heads: int = 32, head_dim: int = 32) -> CrossAttentionConfig:
    """CogAgent's high-resolution branch: every layer, ungated, a small inner width."""
    return CrossAttentionConfig(
        kind="parallel", placement="every", heads=heads, head_dim=head_dim, vision=vision
    )


def flamingo_cross(every: int, media_dim: int | None = None) -> CrossAttentionConfig:
    """OpenFlamingo's GATED XATTN-DENSE: LayerNorm, GELU FF x4, scalar tanh gates at 0, (i + 1) % every == 0."""
    return CrossAttentionConfig(
        kind="gated", every=every, placement="openflamingo", norm="layernorm", ff="gelu", media_dim=media_dim
    )


def mllama_cross(layers: list[int], kv_heads: int) -> CrossAttentionConfig:
    """Mllama's cross-attention layers (transformers ``MllamaCrossAttentionDecoderLayer``)."""
    return CrossAttentionConfig(
        kind="gated",
        layers=layers,
        norm="rmsnorm",
        ff="swiglu",
        qk_norm=True,
        kv_heads=kv_heads,
        empty_rows="zero_ff",
        group_consecutive=True,
    )


FROZEN_LLM = ("vision", "connector", "fusion")  # every part but the LLM


# -- real scale ------------------------------------------------------------------------------------------------
def cogvlm() -> Preset:
    """CogVLM-17B's layout: EVA2-CLIP-E at 490 (1225 tokens) -> GLU -> Vicuna-7B with a visual expert."""
    config = ModelConfig(
        vision=_clip(490, EVA2_CLIP_E14, select_layer=-2),  # the final layer removed
        connector=ConnectorConfig(name="glu", params={"inner": 11008}),
        language=LanguageConfig(model_type="llama", params=dict(VICUNA_7B)),
        processor=_processor(490),
        image_positions="shared",
        fusion=cogvlm_fusion(),
        preset="cogvlm",
    )
    note = {"source": "CogVLM paper, section 2.2 (verify)"}
    recipe = [
        Stage(
            name="pretrain-caption",
            train=("connector", "fusion"),
            lr={"connector": 1e-4, "fusion": 1e-4},
            steps=120000,
            batch_size=8192,
            warmup_steps=1000,
            weight_decay=0.05,
            extra={**note, "image_size": 224},
        ),
        Stage(
            name="pretrain-grounding",
            train=("connector", "fusion"),
            lr={"connector": 1e-5, "fusion": 1e-5},
            steps=60000,
            batch_size=1024,
            weight_decay=0.05,
            extra={**note, "image_size": 490, "data": "captions + referring expressions"},
        ),
        Stage(
            name="sft",
            train=("connector", "fusion", "language"),
            lr={"connector": 1e-5, "fusion": 1e-5, "language": 1e-5},
            steps=6000,
            batch_size=640,
            extra=note,
        ),
    ]
    return Preset(
        "cogvlm",
        config,
        pretrained_tokenizer(config),
        recipe,
        description="CogVLM (EVA2-CLIP-E + GLU + visual expert in every layer, shared image positions)",
    )


def cogagent() -> Preset:
    """CogAgent-18B's layout: CogVLM at 224 plus an EVA2-CLIP-L tower at 1120 read by cross-attention."""
    config = ModelConfig(
        vision=_clip(224, EVA2_CLIP_E14, select_layer=-2),
        connector=ConnectorConfig(name="glu", params={"inner": 11008}),
        language=LanguageConfig(model_type="llama", params=dict(VICUNA_7B)),
        processor=_processor(224, cross_image_size=1120),
        image_positions="shared",
        fusion=cogvlm_fusion(cogagent_cross(_clip(1120, EVA2_CLIP_L14, select_layer=-1))),
        preset="cogagent",
    )
    note = {"source": "CogAgent paper, section 2.3 (verify)"}
    recipe = [
        Stage(
            name="pretrain",
            train=("connector", "fusion"),
            lr={"connector": 2e-5, "fusion": 2e-5},
            steps=60000,
            batch_size=4608,
            warmup_steps=1000,
            extra={**note, "data": "text recognition, visual grounding, GUI imagery"},
        ),
        Stage(
            name="sft",
            train=("connector", "fusion", "language"),
            lr={"connector": 2e-6, "fusion": 2e-6, "language": 2e-6},
            steps=10000,
            batch_size=1024,
            extra=note,
        ),
    ]
    return Preset(
        "cogagent",
        config,
        pretrained_tokenizer(config),
        recipe,
        description="CogAgent (CogVLM at 224 + EVA2-CLIP-L at 1120 cross-attended in every layer)",
    )


def xcomposer2() -> Preset:
    """InternLM-XComposer2-7B's layout: CLIP-L/14 at 490 -> mlp2x_gelu -> InternLM2-7B with Partial LoRA."""
    config = ModelConfig(
        vision=_clip(490, CLIP_VIT_L14, select_layer=-1),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", params=dict(INTERNLM2_7B)),
        processor=_processor(490),
        fusion=FusionConfig(mode="plora", targets=list(ALL_ROUTED), rank=256, alpha=256.0),
        preset="xcomposer2",
    )
    note = {"source": "InternLM-XComposer2 paper, section 3.3 (verify)"}
    recipe = [
        Stage(
            name="pretrain",
            train=FROZEN_LLM,
            lr={"vision": 2e-4, "connector": 2e-4, "fusion": 2e-4},
            steps=4000,
            batch_size=4096,
            warmup_steps=40,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            extra=note,
        ),
        Stage(
            name="sft",
            train=(*FROZEN_LLM, "language"),
            lr={"vision": 5e-5, "connector": 5e-5, "fusion": 5e-5, "language": 5e-5},
            steps=6000,
            batch_size=2048,
            warmup_steps=60,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            extra=note,
        ),
    ]
    return Preset(
        "xcomposer2",
        config,
        pretrained_tokenizer(config),
        recipe,
        description="InternLM-XComposer2 (CLIP-L/14-490 + Partial LoRA on image rows, r = 256)",
    )


def flamingo() -> Preset:
    """OpenFlamingo-9B's layout: CLIP-L/14 -> perceiver (64 latents) -> gated xattn every 4th layer of a
    frozen 7B decoder."""
    config = ModelConfig(
        vision=_clip(224, CLIP_VIT_L14, select_layer=-1),
        connector=ConnectorConfig(
            name="perceiver", params={"n_latents": 64, "depth": 6, "heads": 8, "dim_head": 64}
        ),
        language=LanguageConfig(model_type="llama", params=dict(VICUNA_7B)),
        processor=_processor(224),
        fusion=FusionConfig(mode=None, cross=flamingo_cross(every=4, media_dim=1024)),
        preset="flamingo",
    )
    recipe = [
        Stage(
            name="pretrain",
            train=("connector", "fusion"),
            lr={"connector": 1e-4, "fusion": 1e-4},
            steps=60000,
            batch_size=1920,
            warmup_steps=1875,
            weight_decay=0.1,
            extra={
                "source": "OpenFlamingo report, section 3 (verify)",
                "data": "LAION-2B + MMC4 interleaved",
            },
        )
    ]
    return Preset(
        "flamingo",
        config,
        pretrained_tokenizer(config, ("<image>", ENDOFCHUNK)),
        recipe,
        description="Flamingo / OpenFlamingo (perceiver + tanh-gated cross-attention, frozen LLM)",
    )


def mllama() -> Preset:
    """Llama-3.2-11B-Vision's layout: a CLIP-shaped tower at 560 -> Linear -> gated blocks in front of every
    4th self-attention layer (from layer 3) of a Llama-3.1-8B-shaped decoder."""
    n_layers = LLAMA3_8B["num_hidden_layers"]
    config = ModelConfig(
        vision=_clip(
            560,
            {**CLIP_VIT_L14, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32},
            select_layer=-1,
        ),
        connector=ConnectorConfig(name="linear"),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA3_8B)),
        processor=_processor(560),
        fusion=FusionConfig(mode=None, cross=mllama_cross(list(range(3, n_layers, 4)), kv_heads=8)),
        preset="mllama",
    )
    recipe = [
        Stage(
            name="pretrain",
            train=("vision", "connector", "fusion"),
            lr={"vision": 1e-4, "connector": 1e-4, "fusion": 1e-4},
            steps=100000,
            batch_size=2048,
            extra={"source": "Llama 3 paper, section 7.4 (verify)"},
        )
    ]
    return Preset(
        "mllama",
        config,
        pretrained_tokenizer(config, ("<|image|>",)),
        recipe,
        description="Mllama (Llama-3.2-Vision): gated cross-attention with q/k norms into a frozen Llama",
    )


# -- CPU scale ---------------------------------------------------------------------------------------------------
TINY_VIEW = 64
TINY_CHANNELS = [32, 64, 96]  # three stride-2 stages: 8 x 8 = 64 tokens at 64 px, width 96
TINY_LR = 2e-3


def _tiny(name: str, connector: ConnectorConfig, fusion: FusionConfig, **kw) -> ModelConfig:
    from vlmlab.presets.tiny import TINY_LLAMA

    processor = kw.pop("processor", {})
    view = kw.pop("view", TINY_VIEW)
    return ModelConfig(
        vision=VisionConfig(
            name="convnet", image_size=view, params={"channels": list(TINY_CHANNELS), "pool": 1}
        ),
        connector=connector,
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=view,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            max_length=256,
            **processor,
        ),
        fusion=fusion,
        preset=name,
        **kw,
    )


def frozen_llm_recipe(
    fusion_steps: int, train: tuple[str, ...] = FROZEN_LLM, lr: dict[str, float] | None = None
) -> list[Stage]:
    """The ``llm`` stand-in stage, then the paper's pretraining with the LLM frozen (``lr``: per-part overrides)."""
    return [
        Stage(
            name="llm",
            train=("language",),
            lr={"language": TINY_LR},
            steps=300,
            batch_size=32,
            warmup_steps=15,
            extra={
                "why": "stands in for the pretrained LLM the paper starts from (the world's LLM is random)"
            },
        ),
        Stage(
            name="pretrain",
            train=train,
            lr={**dict.fromkeys(train, TINY_LR), **(lr or {})},
            steps=fusion_steps,
            batch_size=32,
            warmup_steps=30,
        ),
    ]


def _tiny_preset(name: str, config: ModelConfig, recipe: list[Stage], description: str) -> Preset:
    from vlmlab.presets.tiny import world_tokenizer

    return Preset(name, config, lambda: world_tokenizer(), recipe, description=description)


def cogvlm_tiny() -> Preset:
    config = _tiny(
        "cogvlm-tiny",
        ConnectorConfig(name="glu", params={"inner": 256}),
        cogvlm_fusion(),
        image_positions="shared",
    )
    return _tiny_preset(
        "cogvlm-tiny",
        config,
        frozen_llm_recipe(700),
        "CogVLM's visual expert and shared positions at CPU scale",
    )


def cogagent_tiny() -> Preset:
    """Low resolution 32 px (4 x 4 tokens through the expert); the high-resolution tower at 96 px (12 x 12 tokens,
    width 96) read by 4 heads of 16 (a 64-wide inner space, half the LLM's)."""
    hires = VisionConfig(name="convnet", image_size=96, params={"channels": list(TINY_CHANNELS), "pool": 1})
    config = _tiny(
        "cogagent-tiny",
        ConnectorConfig(name="glu", params={"inner": 256}),
        cogvlm_fusion(cogagent_cross(hires, heads=4, head_dim=16)),
        image_positions="shared",
        view=32,
        processor={"cross_image_size": 96},
    )
    return _tiny_preset(
        "cogagent-tiny",
        config,
        frozen_llm_recipe(700),
        "CogAgent's high-resolution cross-attention at CPU scale",
    )


def xcomposer2_tiny() -> Preset:
    config = _tiny(
        "xcomposer2-tiny",
        ConnectorConfig(name="mlp2x_gelu"),
        FusionConfig(mode="plora", targets=list(ALL_ROUTED), rank=32, alpha=32.0),
    )
    return _tiny_preset(
        "xcomposer2-tiny", config, frozen_llm_recipe(700), "InternLM-XComposer2's Partial LoRA at CPU scale"
    )


def flamingo_tiny() -> Preset:
    """Flamingo's gated block (LayerNorm, GELU FF x4, tanh gates at 0) in front of every 2nd layer (OpenFlamingo's
    placement: layers 1 and 3), reading a Linear over the 64 patch features of each image.

    Not the perceiver: trained from scratch through gates that start shut, with the LLM frozen, the perceiver never
    lifted the model above its blind baseline in 1000 steps (16 latents x 2 layers with blocks in front of every
    layer at lr 2e-3 and 1e-2 or of every 2nd layer at 2e-3; 64 latents x 1 layer in front of every layer at 2e-3
    and 1e-2), nor did a Linear with blocks in front of every layer at 1e-2; this composition does
    (scripts/fusion.py). ``perceiver-tiny`` and the real-scale ``flamingo`` use the perceiver."""
    config = _tiny(
        "flamingo-tiny",
        ConnectorConfig(name="linear"),
        FusionConfig(mode=None, cross=flamingo_cross(every=2)),
    )
    return _tiny_preset(
        "flamingo-tiny",
        config,
        frozen_llm_recipe(700),
        "Flamingo's gated cross-attention blocks at CPU scale",
    )


def mllama_tiny() -> Preset:
    """Mllama's block (RMSNorm, SwiGLU, q/k norms, GQA) in front of layers 1 and 3; a Linear over the 64 patch
    features."""
    config = _tiny(
        "mllama-tiny",
        ConnectorConfig(name="linear"),
        FusionConfig(mode=None, cross=mllama_cross([1, 3], kv_heads=2)),
    )
    return _tiny_preset(
        "mllama-tiny", config, frozen_llm_recipe(700), "Mllama's gated cross-attention layout at CPU scale"
    )
