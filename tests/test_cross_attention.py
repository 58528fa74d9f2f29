"""Cross-attention fusion (``fusion.cross``, models/fusion/cross.py): Flamingo's gated blocks and CogAgent's
high-resolution branch hooked into a pretrained decoder. SYSTEMS.md §9, §21 invariants: gates at 0 give the base
LLM's logits for any image; text before the first image is unaffected by the images; a token after image k is
unaffected by other images; CogAgent with its cross-attention output zeroed is the CogVLM path; the cross K/V do
not depend on the text; a frozen LLM gets no gradient; the base LLM's keys load; cached = uncached generation."""

import dataclasses

import pytest
import torch
from PIL import Image

from conftest import LLAMA, train_step_with_frozen_llm
from vlmlab.config import (
    ConnectorConfig,
    CrossAttentionConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
)
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.fusion.cross import cross_layers, media_mask
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.processing.processor import Processor
from vlmlab.training.stages import Stage, apply_stage

CONVNET = VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2})
HIRES = VisionConfig(name="convnet", image_size=64, params={"channels": [8, 12], "pool": 2})


def gated_config(tokenizer, cross=None, **kw):
    cross = cross or CrossAttentionConfig(kind="gated", every=1)
    return ModelConfig(
        vision=CONVNET,
        connector=ConnectorConfig(
            name="perceiver", params={"n_latents": 4, "depth": 1, "heads": 2, "dim_head": 8}
        ),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=32, max_length=96),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        fusion=FusionConfig(mode=None, cross=cross),
        **kw,
    )


def cogagent_config(tokenizer, with_cross=True):
    cross = CrossAttentionConfig(kind="parallel", placement="every", heads=2, head_dim=8, vision=HIRES)
    return ModelConfig(
        vision=CONVNET,
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=32, max_length=96, cross_image_size=64 if with_cross else None),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_positions="shared",
        fusion=FusionConfig(mode="expert", cross=cross if with_cross else None),
    )


def base_of(model):
    """The bare LLM with the same weights, as a model without fusion."""
    cfg = dataclasses.replace(model.config, fusion=None, connector=ConnectorConfig(name="mlp2x_gelu"))
    base = VisionLanguageModel(cfg).eval()
    result = base.language.load_state_dict(model.language.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    return base


def perturb(model, scale=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.part_parameters("fusion"):
            p.add_(torch.randn_like(p) * scale)


def chat(proc, content, images):
    return proc([[{"role": "user", "content": content}]], [images])


def image(colour, size=(40, 30)):
    return Image.new("RGB", size, colour)


@pytest.fixture
def gated(tokenizer):
    torch.manual_seed(0)
    model = VisionLanguageModel(gated_config(tokenizer)).eval()
    return model, Processor(tokenizer, model.config.processor, model.num_image_tokens)


# -- the media mask ------------------------------------------------------------------------------------------
def test_media_mask_follows_flamingo_idefics_and_mllama():
    I, E = 9, 1  # noqa: E741  (image token, end of document)
    ids = torch.tensor([[5, I, 6, 7, I, 8, E, 3, I, I, 4]])
    seen = media_mask(ids, I)[0]  # [T, N]
    # Immediate: a token sees the latest image, its own <image> token included; before the first, none.
    assert [r.nonzero().flatten().tolist() for r in seen] == [
        [],
        [0],
        [0],
        [0],
        [1],
        [1],
        [1],
        [1],
        [2],
        [3],
        [3],
    ]
    reset = media_mask(ids, I, reset_token_id=E)[0]  # Idefics: after </s> nothing until the next image
    assert [r.nonzero().flatten().tolist() for r in reset][6:9] == [[1], [], [2]]
    group = media_mask(ids, I, group_consecutive=True)[0]  # Mllama: adjacent images are one group
    assert [r.nonzero().flatten().tolist() for r in group][8:] == [[2], [2, 3], [2, 3]]
    padded = media_mask(torch.tensor([[5, 6, 7], [I, 6, 7]]), I)
    assert padded.shape == (2, 3, 1) and not padded[0].any() and padded[1].all()


def test_placements_follow_both_references():
    assert cross_layers(8, 4, "idefics") == [0, 4]
    assert cross_layers(8, 4, "openflamingo") == [3, 7]
    assert cross_layers(3, 4, "every") == [0, 1, 2]
    with pytest.raises(ConfigError, match="placement"):
        cross_layers(8, 4, "nope")


# -- gated (Flamingo) ---------------------------------------------------------------------------------------
def test_gates_at_zero_give_the_base_llm_for_any_image(gated):
    model, proc = gated
    b = chat(proc, "<image> What color? <image> and this?", [image("red"), image("blue")])
    assert (b["input_ids"] == model.config.image_token_id).sum() == 2  # one text token per image
    base = base_of(model)
    plain = base.language(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(model(**b).logits, plain)
    text = chat(proc, "What color?", [])
    perturb(model)
    assert torch.equal(model(**text).logits, base(**text).logits)  # no image: the blocks do nothing


def test_text_before_the_first_image_and_tokens_after_image_k_see_only_their_image(gated):
    model, proc = gated
    perturb(model)
    red_blue = chat(proc, "Look: <image> one, <image> two", [image("red"), image("blue")])
    green_blue = chat(proc, "Look: <image> one, <image> two", [image("green"), image("blue")])
    red_green = chat(proc, "Look: <image> one, <image> two", [image("red"), image("green")])
    ids = red_blue["input_ids"][0]
    first, second = (ids == model.config.image_token_id).nonzero().flatten().tolist()
    a, b, c = (model(**x).logits[0] for x in (red_blue, green_blue, red_green))
    assert torch.equal(a[:first], b[:first])  # before any image: no image matters
    assert not torch.allclose(a[first:second], b[first:second], atol=1e-5)  # image 1 matters after it
    assert torch.equal(a[:second], c[:second])  # image 2 does not matter before it
    assert not torch.allclose(a[second:], c[second:], atol=1e-5)
    # In the block itself a token after image 2 reads image 2 only (later layers mix tokens by self-attention,
    # so image 1 reaches it through the tokens between the images, as in Flamingo).
    seen = []
    hook = (
        model.language.get_decoder().layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    )
    for x in (red_blue, green_blue):
        model(**x)
    hook.remove()
    assert torch.equal(seen[0][0, second:], seen[1][0, second:])
    assert not torch.allclose(seen[0][0, first:second], seen[1][0, first:second], atol=1e-5)


def test_frozen_llm_gets_no_gradient_and_base_keys_load(gated, tokenizer):
    model, proc = gated
    train_step_with_frozen_llm(model, proc)  # asserts the LLM gets no gradient
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]
    assert gates and all(p.grad is not None for p in gates)
    # The decoder's keys are the base LLM's: the blocks live under cross_attn, outside language.
    base = base_of(model)
    assert set(model.language.state_dict()) == set(base.language.state_dict())
    assert any(k.startswith("cross_attn.0.attn.q_proj") for k in model.state_dict())


def test_gated_cached_generation_equals_uncached_and_round_trips(gated, tmp_path):
    model, proc = gated
    perturb(model)
    b = proc(
        [
            [{"role": "user", "content": "<image> What?"}],
            [{"role": "user", "content": "Hi <image> and <image>?"}],
        ],
        [[image("red")], [image("blue"), image("green")]],
    )
    cached = model.generate(**b, max_new_tokens=8)
    assert torch.equal(cached, model.generate(**b, max_new_tokens=8, use_cache=False))
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion == model.config.fusion
    assert torch.equal(loaded(**b).logits, model(**b).logits)


def test_mllama_rule_for_rows_without_images(tokenizer):
    """``zero_ff``: a row that sees no image attends to all of them and only its FF output is dropped
    (transformers' Mllama), so text before the image does depend on it once the attention gate is open."""
    cross = CrossAttentionConfig(
        kind="gated", every=1, empty_rows="zero_ff", qk_norm=True, kv_heads=2, gate="vector"
    )
    torch.manual_seed(0)
    model = VisionLanguageModel(gated_config(tokenizer, cross)).eval()
    proc = Processor(tokenizer, model.config.processor, model.num_image_tokens)
    perturb(model)
    red, green = (chat(proc, "Look: <image> one", [image(c)]) for c in ("red", "green"))
    first = int((red["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert not torch.allclose(model(**red).logits[0, :first], model(**green).logits[0, :first], atol=1e-5)


def test_gated_errors_are_one_line(gated, tokenizer):
    model, proc = gated
    b = chat(proc, "<image> What?", [image("red")])
    with pytest.raises(SampleError, match="image tokens in the input but no pixel_values"):
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with pytest.raises(SampleError, match="2 images in pixel_values"):
        model(**{**b, "pixel_values": torch.cat([b["pixel_values"]] * 2)})
    bad = dataclasses.replace(gated_config(tokenizer), fusion=FusionConfig(mode=None))
    with pytest.raises(ConfigError, match="neither mode"):
        VisionLanguageModel(bad)
    from vlmlab.inference.batch import DecodeBatch

    with pytest.raises(ConfigError, match="cross-attention models"):
        DecodeBatch(model, 64)
    tiled = gated_config(tokenizer)
    tiled.processor.tiler = "dynamic"
    with pytest.raises(ConfigError, match="one view per image"):
        VisionLanguageModel(tiled)


# -- parallel (CogAgent) ------------------------------------------------------------------------------------
@pytest.fixture
def cogagent(tokenizer):
    torch.manual_seed(0)
    model = VisionLanguageModel(cogagent_config(tokenizer)).eval()
    return model, Processor(tokenizer, model.config.processor, model.num_image_tokens)


def test_cogagent_with_cross_output_zeroed_is_the_cogvlm_path(cogagent, tokenizer):
    model, proc = cogagent
    perturb(model)
    b = chat(proc, "What color? <image> Tell me.", [image("red", (90, 70))])
    assert b["cross_pixel_values"].shape == (1, 3, 64, 64)  # the high-resolution view
    cogvlm = VisionLanguageModel(cogagent_config(tokenizer, with_cross=False)).eval()
    own = cogvlm.state_dict()
    cogvlm.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
    plain = {k: v for k, v in b.items() if k != "cross_pixel_values"}
    assert not torch.allclose(model(**b).logits, cogvlm(**plain).logits, atol=1e-5)
    with torch.no_grad():
        for block in model.cross_attn.values():
            block.attn.o_proj.weight.zero_()
    assert torch.equal(model(**b).logits, cogvlm(**plain).logits)


def test_cogagent_every_token_sees_the_high_res_image_and_kv_ignore_the_text(cogagent):
    model, proc = cogagent
    perturb(model)
    red = chat(proc, "Hi there <image> Tell me.", [image("red", (90, 70))])
    other = chat(proc, "Hi there <image> Tell me.", [image("red", (90, 70))])
    other["cross_pixel_values"] = torch.randn_like(red["cross_pixel_values"])
    first = int((red["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    a, b = model(**red).logits[0], model(**other).logits[0]
    assert not torch.allclose(a[:first], b[:first], atol=1e-5)  # not causal: text before the image sees it
    prompt2 = chat(proc, "Something else entirely <image>", [image("red", (90, 70))])
    kv = []
    for x in (red, prompt2):
        with model.fused(x["input_ids"], x["pixel_values"], cross_pixel_values=x["cross_pixel_values"]) as _:
            decoder = model.language.get_decoder()
            state = decoder._vlmlab_media[0]
            kv.append(state.keys_values(model.cross_attn["0"]))
    assert torch.equal(kv[0][0], kv[1][0]) and torch.equal(kv[0][1], kv[1][1])
    assert kv[0][0].shape[-1] == 8  # head_dim: the small inner width


def test_cogagent_cached_generation_equals_uncached_and_round_trips(cogagent, tmp_path):
    model, proc = cogagent
    perturb(model)
    b = chat(proc, "What color? <image>", [image("red", (90, 70))])
    assert torch.equal(
        model.generate(**b, max_new_tokens=6), model.generate(**b, max_new_tokens=6, use_cache=False)
    )
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(**b).logits, model(**b).logits)
    stage = Stage(name="s", train=("fusion",), lr={"fusion": 1e-3}, steps=1)
    apply_stage(model, stage)
    model.train()
    labels = b["input_ids"].masked_fill(b["input_ids"] == model.config.image_token_id, -100)
    model(**{**b, "labels": labels}).loss.backward()
    assert all(p.grad is None for p in model.part_parameters("language"))
    assert all(p.grad is not None for p in model.cross_vision.parameters())
