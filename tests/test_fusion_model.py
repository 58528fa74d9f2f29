"""Deep fusion in the composed model (``ModelConfig.fusion``): CogVLM's visual expert and XComposer2's partial LoRA
inside the decoder of a ``VisionLanguageModel``, routed by the image placeholder rows. SYSTEMS.md §0, §8, §14:
text-only input is the base LLM exactly; the image weights are their own trainable part (the LLM frozen gets no
gradient); the base LLM's keys stay in the state dict; cached generation equals uncached; the model saves and
loads with its fusion weights."""

import dataclasses

import pytest
import torch
from PIL import Image

from conftest import LLAMA, train_step_with_frozen_llm
from vlmlab.config import (
    ConnectorConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
)
from vlmlab.errors import ConfigError
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.processing.processor import Processor

MODES = ["expert", "plora"]


def config(tokenizer, mode):
    return ModelConfig(
        vision=VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2}),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=32, max_length=96),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        fusion=None if mode is None else FusionConfig(mode=mode, rank=4, alpha=8.0),
    )


def models(tokenizer, mode):
    """A fusion model and the same weights without fusion (the base LLM)."""
    torch.manual_seed(0)
    fused = VisionLanguageModel(config(tokenizer, mode)).eval()
    base = VisionLanguageModel(config(tokenizer, None)).eval()
    own = base.state_dict()
    missing = base.load_state_dict({k: v for k, v in fused.state_dict().items() if k in own}, strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys  # every base key is in the fused model
    return fused, base, Processor(tokenizer, fused.config.processor, fused.num_image_tokens)


def perturb(model):
    with torch.no_grad():
        for p in model.part_parameters("fusion"):
            p.add_(torch.randn_like(p) * 0.5)


def batch(proc, with_image=True):
    content = ("What color is the shape? " + "<image>" if with_image else "What color is the shape?") + " red"
    images = [Image.new("RGB", (40, 30), "red")] if with_image else []
    return proc([[{"role": "user", "content": content}]], [images])


@pytest.mark.parametrize("mode", MODES)
def test_text_only_is_the_base_llm_and_image_rows_start_equal(tokenizer, mode):
    fused, base, proc = models(tokenizer, mode)
    perturb(fused)
    text = batch(proc, with_image=False)
    assert torch.equal(fused(**text).logits, base(**text).logits)
    fresh, base, proc = models(tokenizer, mode)  # at init: expert = copy, LoRA B = 0
    b = batch(proc)
    assert torch.allclose(fresh(**b).logits, base(**b).logits, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_image_weights_change_only_what_follows_the_image(tokenizer, mode):
    fused, base, proc = models(tokenizer, mode)
    perturb(fused)
    b = batch(proc)
    first = int((b["input_ids"][0] == fused.config.image_token_id).nonzero()[0])
    got, want = fused(**b).logits, base(**b).logits
    assert torch.equal(got[:, :first], want[:, :first])  # causal: text before the image is the base LLM
    assert not torch.allclose(got[:, first:], want[:, first:], atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_fusion_is_its_own_part_and_a_frozen_llm_gets_no_gradient(tokenizer, mode):
    fused, _, proc = models(tokenizer, mode)
    fusion = fused.part_parameters("fusion")
    assert fusion and not {id(p) for p in fusion} & {id(p) for p in fused.part_parameters("language")}
    train_step_with_frozen_llm(fused, proc)  # asserts the LLM gets no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion)
    keys = set(fused.state_dict())
    assert "language.model.layers.0.self_attn.q_proj.weight" in keys  # the base LLM's key, unchanged


@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached_and_the_model_round_trips(tokenizer, mode, tmp_path):
    fused, base, proc = models(tokenizer, mode)
    perturb(fused)
    b = batch(proc)
    cached = fused.generate(**b, max_new_tokens=8)
    assert torch.equal(cached, fused.generate(**b, max_new_tokens=8, use_cache=False))
    assert not torch.equal(fused(**b).logits, base(**b).logits)
    fused.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion == fused.config.fusion
    assert torch.equal(loaded(**b).logits, fused(**b).logits)


def test_bad_fusion_settings_fail_with_one_line(tokenizer):
    cfg = config(tokenizer, "expert")
    with pytest.raises(ConfigError, match="fusion.mode"):
        VisionLanguageModel(dataclasses.replace(cfg, fusion=FusionConfig(mode="nope")))


def test_inspect_counts_the_fusion_part(monkeypatch):
    from vlmlab.presets import PRESETS
    from vlmlab.summary import summarize

    tiny = PRESETS["tiny"]()
    fused = dataclasses.replace(
        tiny, config=dataclasses.replace(tiny.config, fusion=FusionConfig(mode="expert"))
    )
    monkeypatch.setitem(PRESETS, "tiny-fused", lambda: fused)
    s = summarize("tiny-fused", [])
    # A visual expert is a copy of every routed projection: 4 layers x (4 x 128^2 + 3 x 128 x 384) weights.
    assert s["parts"]["fusion"]["params"] == 4 * (4 * 128 * 128 + 3 * 128 * 384)
    assert s["parts"]["fusion"]["name"] == "routed (expert)"
    assert s["total_params"] == summarize("tiny", [])["total_params"] + s["parts"]["fusion"]["params"]


def test_shared_image_positions_follow_cogvlm():
    """Every token of one image takes its first token's position; text continues from there; padding skipped."""
    from vlmlab.models.vlm import shared_image_positions

    I = 9  # noqa: E741  (the image token)
    ids = torch.tensor([[0, 0, 5, I, I, I, 6, 7, I, I, 8], [5, 6, I, I, I, I, 7, 8, I, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11])
    got = shared_image_positions(ids, mask, I)
    assert got[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 4, 4, 5]
    assert got[1].tolist() == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7]  # two images, the second of one token


@pytest.mark.parametrize("mode", [None, "expert"])
def test_shared_positions_generate_cached_equals_uncached(tokenizer, mode):
    torch.manual_seed(0)
    cfg = dataclasses.replace(config(tokenizer, mode), image_positions="shared")
    model = VisionLanguageModel(cfg).eval()
    proc = Processor(tokenizer, cfg.processor, model.num_image_tokens)
    b = batch(proc)
    assert torch.equal(
        model.generate(**b, max_new_tokens=6), model.generate(**b, max_new_tokens=6, use_cache=False)
    )
    sequential = VisionLanguageModel(dataclasses.replace(cfg, image_positions="sequential")).eval()
    sequential.load_state_dict(model.state_dict())
    assert not torch.allclose(model(**b).logits, sequential(**b).logits, atol=1e-5)  # the positions matter
    text = batch(proc, with_image=False)
    assert torch.equal(model(**text).logits, sequential(**text).logits)  # and only where images are
    with pytest.raises(ConfigError, match="image_positions"):
        VisionLanguageModel(dataclasses.replace(cfg, image_positions="nope"))
