"""The deep-fusion presets (presets/fusion.py): the papers' numbers at real scale (built on the meta device, no
memory), each paper's trainable set per stage (the LLM frozen where the paper freezes it), and the CPU-scale
variants' recipes (an ``llm`` stage standing in for the pretrained LLM, then the fusion stages with it frozen)."""

import pytest
import torch

from vlmlab.errors import ConfigError
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.training.stages import apply_stage


def meta(name):
    preset = PRESETS[name]()
    with torch.device("meta"):
        return preset, VisionLanguageModel(preset.config, load_pretrained=False)


def count(params) -> int:
    return sum(p.numel() for p in params)


def trainable(model, stage) -> set[int]:
    return {id(p) for g in apply_stage(model, stage) for p in g["params"]}


def test_cogvlm_is_17b_with_an_expert_copy_of_every_projection():
    preset, model = meta("cogvlm")
    assert model.num_image_tokens == 35 * 35  # 490 / 14
    lm = count(model.part_parameters("language"))
    assert 6.7e9 < lm < 6.8e9  # Vicuna-7B
    # The expert repeats every attention and MLP projection of the 32 layers (not embeddings, norms, head).
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert count(model.part_parameters("fusion")) == 32 * per_layer
    assert 17.0e9 < count(model.parameters()) < 18.0e9  # "CogVLM-17B"
    assert model.config.image_positions == "shared"
    language = {id(p) for p in model.part_parameters("language")}
    vision = {id(p) for p in model.part_parameters("vision")}
    for stage in preset.recipe[:2]:  # pretraining: ViT and LLM frozen
        assert not trainable(model, stage) & (language | vision)
    assert language <= trainable(model, preset.recipe[-1])  # SFT trains more
    with pytest.raises(ConfigError, match="language.pretrained"):
        preset.make_tokenizer()


def test_cogagent_adds_a_1120_px_branch_with_head_dim_32_in_every_layer():
    preset, model = meta("cogagent")
    assert model.num_image_tokens == 256  # the low-resolution path at 224
    assert model.cross_vision.num_tokens == 80 * 80  # 1120 / 14
    assert len(model.cross_attn) == 32  # every layer
    attn = model.cross_attn["0"].attn
    assert (attn.heads, attn.head_dim, attn.q_proj.out_features) == (32, 32, 1024)
    assert attn.k_proj.in_features == 1024  # EVA2-CLIP-L's width
    assert model.cross_attn["0"].attn_gate is None  # not gated
    assert 18.0e9 < count(model.parameters()) < 18.5e9  # "CogAgent-18B"
    pretrain = trainable(model, preset.recipe[0])
    assert {id(p) for p in model.cross_vision.parameters()} <= pretrain
    assert not pretrain & {id(p) for p in model.part_parameters("language")}
    assert not pretrain & {id(p) for p in model.part_parameters("vision")}


def test_xcomposer2_partial_lora_rank_256_on_every_projection():
    preset, model = meta("xcomposer2")
    assert model.num_image_tokens == 35 * 35
    d, inner, kv = 4096, 14336, 8 * 128
    # r x (in + out) per projection: q, o (d -> d), k, v (d -> 1024), gate, up (d -> inner), down (inner -> d).
    per_layer = 256 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + inner))
    assert count(model.part_parameters("fusion")) == 32 * per_layer
    pretrain, sft = (trainable(model, s) for s in preset.recipe)
    language = {id(p) for p in model.part_parameters("language")}
    assert not pretrain & language and language <= sft  # LLM frozen, then everything jointly
    assert {id(p) for p in model.part_parameters("vision")} <= pretrain


def test_flamingo_and_mllama_place_gated_blocks_as_their_references():
    preset, model = meta("flamingo")
    assert sorted(int(k) for k in model.cross_attn) == [3, 7, 11, 15, 19, 23, 27, 31]  # (i + 1) % 4 == 0
    assert model.num_image_tokens == 1 and model.num_media_tokens == 64  # one <image>, 64 latents
    assert all(b.attn_gate.numel() == 1 for b in model.cross_attn.values())  # scalar gates (zeros at init)
    assert not trainable(model, preset.recipe[0]) & {id(p) for p in model.part_parameters("language")}
    _, mllama = meta("mllama")
    assert sorted(int(k) for k in mllama.cross_attn) == list(range(3, 32, 4))
    block = mllama.cross_attn["3"]
    assert block.attn.q_norm is not None and block.attn.kv_heads == 8 and block.empty_rows == "zero_ff"


@pytest.mark.parametrize(
    "name", ["cogvlm-tiny", "cogagent-tiny", "xcomposer2-tiny", "flamingo-tiny", "mllama-tiny"]
)
def test_tiny_recipes_warm_the_llm_then_freeze_it(name):
    preset = PRESETS[name]()
    first, *rest = preset.recipe
    assert first.train == ("language",)
    assert rest and all("language" not in s.train and "fusion" in s.train for s in rest)
