"""BLIP-2 (Li et al., 2023), InstructBLIP (Dai et al., 2023) and InternLM-XComposer v1 (Zhang et al., 2023): a
frozen EVA-CLIP ViT-g/14 read by a Q-Former (learned queries, BERT-base layers cross-attending to the image every
other layer) whose projected query outputs are soft prompts of the LLM (SYSTEMS.md §2, §6).

Real-scale presets carry the papers' numbers and take the decoder (and its tokenizer) from a local directory
(``language.pretrained``). The ``-tiny`` variants keep the structure at CPU scale and train on the embedded world:
a from-scratch ConvNet tower (16 spatial tokens + a global one), a 3-layer, 128-wide Q-Former (cross-attention in
layers 0 and 2) with 16 queries, and TINY_LLAMA. Departures, and why: (1) the tower is random, so it trains in
stage 1 (BLIP-2 freezes a pretrained ViT); (2) the LLM is random too, so stage 2 trains it with the Q-Former
(BLIP-2 freezes a pretrained LLM) - a frozen random LM cannot learn to answer; (3) the Q-Former's text vocabulary
is the LM's world tokenizer plus [CLS] (id 512) and [DEC] (513), not BERT's WordPiece.
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
from vlmlab.presets.llava import VICUNA_7B, _pretrained_tokenizer
from vlmlab.training.stages import Stage

# EVA-CLIP ViT-g/14 as transformers' Blip2VisionConfig (39 layers: EVA's last layer already removed).
EVA_VIT_G14 = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
# BERT-base Q-Former: vocab 30522 + [DEC]; [CLS] = 101, [DEC] = 30522 (LAVIS ``init_tokenizer``).
QFORMER_BASE = {
    "hidden_size": 768,
    "num_layers": 12,
    "num_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 2,
    "vocab_size": 30523,
    "max_position_embeddings": 512,
    "cls_token_id": 101,
    "dec_token_id": 30522,
    "pad_token_id": 0,
    "max_text_len": 32,
}
OPT_2_7B = {
    "vocab_size": 50272,
    "hidden_size": 2560,
    "ffn_dim": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 2560,
    "do_layer_norm_before": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}
# InternLM-7B as a Llama shape (XComposer v1's decoder; its remote code adds biases, ignored here).
INTERNLM_7B = {
    "vocab_size": 103168,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# BLIP-2's optimiser (paper §4): AdamW, betas (0.9, 0.98), weight decay 0.05, peak lr 1e-4, 2k warmup steps.
BLIP2_OPT = {"betas": (0.9, 0.98), "weight_decay": 0.05, "warmup_steps": 2000}


def _eva_config(name: str, queries: int, lm_type: str, lm: dict, instruction: bool = False) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            name="blip_vit",
            image_size=224,
            select_layer=-1,
            select_feature="cls_patch",
            params=dict(EVA_VIT_G14),
        ),
        connector=ConnectorConfig(
            name="qformer", params={"num_queries": queries, **QFORMER_BASE, "instruction": instruction}
        ),
        language=LanguageConfig(model_type=lm_type, params=dict(lm)),
        processor=ProcessorConfig(
            image_size=224,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            max_length=512,
            qformer_instruction=instruction,
        ),
        preset=name,
    )


def blip2() -> Preset:
    """BLIP-2 ViT-g + OPT-2.7B: stage 1 Q-Former alone (ITC + ITM + ITG, ViT frozen, 250k steps at batch 1680),
    stage 2 Q-Former + proj under the LM loss (ViT and LLM frozen, 80k steps at batch 1920)."""
    config = _eva_config("blip2", 32, "opt", OPT_2_7B)
    recipe = [
        Stage(
            name="representation",
            train=("connector",),
            lr={"connector": 1e-4},
            steps=250_000,
            batch_size=1680,
            objective="qformer_stage1",
            tasks=("caption",),
            **BLIP2_OPT,
        ),
        Stage(
            name="generative",
            train=("connector",),
            lr={"connector": 1e-4},
            steps=80_000,
            batch_size=1920,
            tasks=("caption",),
            **BLIP2_OPT,
        ),
    ]
    return Preset(
        "blip2",
        config,
        _pretrained_tokenizer(config, template="llava-v1"),
        recipe,
        description="BLIP-2 (EVA ViT-g/14 + 32-query Q-Former + OPT-2.7B)",
    )


def instructblip() -> Preset:
    """InstructBLIP (Vicuna-7B): the BLIP-2 Q-Former made instruction-aware (the instruction's tokens follow the
    queries inside it); instruction tuning trains the Q-Former alone from BLIP-2's weights (lr 1e-5, batch 192,
    60k steps max, 1k warmup), ViT and LLM frozen. The processor hands the user's text to the Q-Former
    (``qformer_instruction``; the Q-Former's own BERT tokenizer when the model has one, ``qformer_tokenizer/``)."""
    config = _eva_config("instructblip", 32, "llama", VICUNA_7B, instruction=True)
    recipe = [
        Stage(
            name="instruct",
            train=("connector",),
            lr={"connector": 1e-5},
            steps=60_000,
            batch_size=192,
            warmup_steps=1000,
            weight_decay=0.05,
            betas=(0.9, 0.999),
        )
    ]
    return Preset(
        "instructblip",
        config,
        _pretrained_tokenizer(config),
        recipe,
        description="InstructBLIP (EVA ViT-g/14 + instruction-aware Q-Former + Vicuna-7B)",
    )


def xcomposer() -> Preset:
    """InternLM-XComposer v1: EVA ViT-g -> 64-query Q-Former ("perceive sampler") -> InternLM-7B; pretraining
    trains sampler + LLM with the ViT frozen, SFT the sampler and the LLM (LoRA in the paper; full here) (verify)."""
    config = _eva_config("xcomposer", 64, "llama", INTERNLM_7B)
    recipe = [
        Stage(
            name="pretrain",
            train=("connector", "language"),
            lr={"connector": 2e-4, "language": 2e-4},
            steps=30_000,
            batch_size=1024,
            warmup_steps=500,
        ),
        Stage(
            name="sft",
            train=("connector", "language"),
            lr={"connector": 5e-5, "language": 5e-5},
            steps=5_000,
            batch_size=256,
            warmup_steps=100,
        ),
    ]
    return Preset(
        "xcomposer",
        config,
        _pretrained_tokenizer(config),
        recipe,
        description="InternLM-XComposer v1 (EVA ViT-g/14 + 64-query Q-Former + InternLM-7B)",
    )


# -- CPU variants --------------------------------------------------------------------------------------------
def _tiny_config(name: str, queries: int, instruction: bool = False) -> ModelConfig:
    from vlmlab.presets.tiny import IMAGE_SIZE, TINY_LLAMA, VOCAB_SIZE

    qformer = {
        "num_queries": queries,
        "hidden_size": 128,
        "num_layers": 3,
        "num_heads": 4,
        "intermediate_size": 256,
        "cross_attention_frequency": 2,
        "vocab_size": VOCAB_SIZE + 2,  # the world tokenizer's ids, then [CLS] and [DEC]
        "max_position_embeddings": 64,
        "cls_token_id": VOCAB_SIZE,
        "dec_token_id": VOCAB_SIZE + 1,
        "pad_token_id": 0,
        "max_text_len": 32,
        "instruction": instruction,
    }
    return ModelConfig(
        vision=VisionConfig(
            name="convnet",
            image_size=IMAGE_SIZE,
            params={"channels": [32, 64, 128], "pool": 2, "global_token": True},
        ),
        connector=ConnectorConfig(name="qformer", params=qformer),
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=IMAGE_SIZE,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            max_length=128,
            qformer_instruction=instruction,
        ),
        preset=name,
    )


def _tiny_recipe(stage1_steps: int = 300, stage2_steps: int = 1000) -> list[Stage]:
    """Stage 1: BLIP-2's three objectives on captions (tower + Q-Former; the tower is random, so it learns).
    Stage 2: the LM loss on the whole mix, Q-Former + LLM trained (a random LLM must learn), tower frozen."""
    return [
        Stage(
            name="representation",
            train=("vision", "connector"),
            lr={"vision": 3e-4, "connector": 1e-3},
            steps=stage1_steps,
            batch_size=32,
            warmup_steps=10,
            objective="qformer_stage1",
            tasks=("caption",),
        ),
        Stage(
            name="generative",
            train=("connector", "language"),
            lr={"connector": 1e-3, "language": 2e-3},
            steps=stage2_steps,
            batch_size=32,
            warmup_steps=20,
        ),
    ]


def _tiny(name: str, queries: int, description: str, instruction: bool = False) -> Preset:
    from vlmlab.presets.tiny import world_tokenizer

    return Preset(
        name,
        _tiny_config(name, queries, instruction),
        world_tokenizer,
        _tiny_recipe(),
        description=description,
    )


def blip2_tiny() -> Preset:
    return _tiny(
        "blip2-tiny", 16, "BLIP-2 structure at CPU scale (ConvNet + 16-query Q-Former + small Llama)"
    )


def instructblip_tiny() -> Preset:
    return _tiny(
        "instructblip-tiny",
        16,
        "InstructBLIP structure at CPU scale (instruction-aware Q-Former)",
        instruction=True,
    )


def xcomposer_tiny() -> Preset:
    return _tiny("xcomposer-tiny", 32, "InternLM-XComposer v1 structure at CPU scale (32-query Q-Former)")
