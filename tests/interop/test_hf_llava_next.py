"""Parity with transformers' ``llava_next``, ``llava_next_video`` and ``llava_onevision`` on tiny random checkpoints
built offline: vlmlab imports each into its own composition (AnyRes tiler, frame pooling, ``image_newline``), and
must give transformers' logits and greedy tokens on batches with several images per prompt, different aspect
ratios and left padding; its processor must make transformers' ``input_ids`` and pixels; exports load back."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import TEXTS
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

import vlmlab
from vlmlab.processing.processor import Processor
from vlmlab.processing.tokenizer import train_bpe_tokenizer

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZES = [
    (70, 40),
    (30, 50),
    (90, 20),
    (33, 33),
    (64, 100),
]  # (width, height): wide, tall, very wide, square...
CLASSES = {
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "llava_next_video": (LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
}


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=["<video>"])
    t.padding_side = "left"
    return t


def hf_model(kind, tok, tmp_path, seed=0, **extra):
    torch.manual_seed(seed)
    tower = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    onevision = kind == "llava_onevision"
    vc = (
        SiglipVisionConfig(num_hidden_layers=2, **tower)
        if onevision
        else CLIPVisionConfig(num_hidden_layers=3, **tower)
    )
    tc = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    config_cls, model_cls = CLASSES[kind]
    kw = dict(
        vision_config=vc,
        text_config=tc,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        **extra,
    )
    if kind != "llava_next":
        kw["video_token_index"] = tok.convert_tokens_to_ids("<video>")
    if onevision:  # SigLIP has no CLS: OneVision keeps every row of the last layer
        kw.update(vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = model_cls(config_cls(**kw)).eval()
    path = tmp_path / kind
    model.save_pretrained(path)
    return model, path


def images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def conversations(n_images_per_prompt):
    qs = ["What color is the shape?", "How many shapes are there?", "What shape is this?"]
    return [
        [{"role": "user", "content": "<image>\n" * n + qs[i % len(qs)]}]
        for i, n in enumerate(n_images_per_prompt)
    ]


def ours_with_processor(path, tok):
    model = vlmlab.from_pretrained(path).eval()
    return model, Processor(tok, model.config.processor, model.num_image_tokens)


def assert_same_outputs(hf, ours, batch, hf_batch=None):
    hf_batch = hf_batch or batch
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**hf_batch).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    n = batch["input_ids"].shape[1]
    ref_gen = hf.generate(**hf_batch, max_new_tokens=5, do_sample=False)[:, n:]
    assert torch.equal(ours.generate(**batch, max_new_tokens=5), ref_gen)


def reference_next_processor(tok):
    """transformers' LlavaNextProcessor with the tiny checkpoints' settings."""
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS row, as in the hub's llava-next processor configs
    )


def test_llava_next_processor_and_model_match_transformers(tmp_path, tok):
    """Two prompts (two images, then one), five aspect ratios across calls, left padding: transformers'
    LlavaNextProcessor and vlmlab's give identical tensors, and the models identical logits and tokens."""
    hf, path = hf_model("llava_next", tok, tmp_path)
    ours, proc = ours_with_processor(path, tok)
    ref_proc = reference_next_processor(tok)
    for sizes in (SIZES[:3], SIZES[2:5]):
        ims = images(sizes)
        convs = conversations([2, 1])
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        ref = ref_proc(images=ims, text=texts, padding=True, return_tensors="pt")
        got = proc(convs, [ims[:2], ims[2:]])
        for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
            assert torch.equal(got[key], ref[key]), key
        assert_same_outputs(hf, ours, {k: ref[k] for k in ref})


def test_llava_next_video_images_and_videos_match_transformers(tmp_path, tok):
    hf, path = hf_model("llava_next_video", tok, tmp_path)
    ours, proc = ours_with_processor(path, tok)
    cfg = ours.config.processor
    assert (cfg.video.pool, cfg.video.stride, cfg.video.pool_position) == ("average", 2, "before")
    rng = np.random.default_rng(1)
    frames = [
        [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
        for _ in range(2)
    ]
    convs = [
        [{"role": "user", "content": "<video>\nWhat happens?"}],
        [{"role": "user", "content": "<image>\nWhat shape is this? <video>"}],
    ]
    batch = proc(convs, [[], images(SIZES[:1])], videos=[[frames[0]], [frames[1]]])
    # Frames get CLIP preprocessing (what LlavaNextVideoVideoProcessor does, here per frame).
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref_frames = torch.stack([clip(images=f, return_tensors="pt")["pixel_values"] for f in frames])
    assert torch.equal(batch["pixel_values_videos"], ref_frames)
    # 3 frames x (4 / 2)^2 pooled tokens, no newline (transformers' video_seq_length rule).
    assert int((batch["input_ids"][0] == ours.config.video_token_id).sum()) == 3 * 2 * 2
    assert_same_outputs(hf, ours, {k: v for k, v in batch.items() if k != "labels"})


def test_llava_onevision_multi_image_and_video_match_transformers(tmp_path, tok):
    """OneVision: a single image is tiled with anyres_max_N, images sharing a prompt are not; videos are
    bilinearly pooled after the projector with one newline."""
    hf, path = hf_model("llava_onevision", tok, tmp_path, vision_aspect_ratio="anyres_max_1")
    ours, proc = ours_with_processor(path, tok)
    ref_ip = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    assert ours.config.processor.anyres.max_tiles == 1
    ours.config.processor.image_mean = proc.config.image_mean = (0.5, 0.5, 0.5)
    ours.config.processor.image_std = proc.config.image_std = (0.5, 0.5, 0.5)
    ims = images([(70, 40), (30, 50), (96, 64)])
    convs = conversations([2, 1])
    rng = np.random.default_rng(2)
    video = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    convs[1][0]["content"] += " <video>"
    got = proc(convs, [ims[:2], ims[2:]], videos=[[], [video]])
    ref = ref_ip([ims[:2], ims[2:]], return_tensors="pt")
    assert torch.equal(got["pixel_values"], ref["pixel_values"])
    assert torch.equal(got["image_sizes"], ref["image_sizes"])
    assert got["batch_num_images"].tolist() == ref["batch_num_images"].tolist() == [2, 1]
    # Token counts: transformers' processor rule (its constructor needs torchvision's video processor, so the
    # rule is called on a stand-in holding the settings it reads).
    ref_proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    ref_proc.image_processor, ref_proc.num_image_tokens, ref_proc.vision_aspect_ratio = (
        ref_ip,
        16,
        "anyres_max_1",
    )
    n_single = ref_proc._get_number_of_features(64, 96, 32, 32)
    ids = got["input_ids"]
    assert int((ids[0] == ours.config.image_token_id).sum()) == 2 * (16 + 1)
    assert int((ids[1] == ours.config.image_token_id).sum()) == n_single
    assert int((ids[1] == ours.config.video_token_id).sum()) == 2 * 2 * 2 + 1
    assert_same_outputs(hf, ours, {k: v for k, v in got.items() if k != "labels"})


@pytest.mark.parametrize("kind", list(CLASSES))
def test_export_reloads_in_transformers_with_the_same_logits(tmp_path, tok, kind):
    hf, path = hf_model(kind, tok, tmp_path)
    ours, proc = ours_with_processor(path, tok)
    ours.save_pretrained(tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    back = CLASSES[kind][1].from_pretrained(tmp_path / "out").eval()
    batch = proc(conversations([1, 1]), [images(SIZES[:1]), images(SIZES[1:2])])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, hf(**batch).logits, atol=1e-5, rtol=1e-5)


def test_processor_token_counts_match_transformers_for_random_sizes(tmp_path, tok):
    """Property test: for random sizes and aspect ratios, vlmlab's count == transformers' processor rule ==
    the rows the model produces (the model raises on any mismatch)."""
    _, path = hf_model("llava_next", tok, tmp_path)
    ours, proc = ours_with_processor(path, tok)
    ref_proc = reference_next_processor(tok)
    rng = np.random.default_rng(3)
    for _ in range(40):
        w, h = (int(x) for x in np.exp(rng.uniform(math.log(8), math.log(400), 2)))
        im = Image.new("RGB", (w, h))
        n = proc.image_token_counts([im])[0]
        assert (
            n == ref_proc._get_number_of_features(h, w, 32, 32) - 1
        )  # transformers counts the CLS, then drops it
        pix = proc.encode_visuals([im])
        with torch.no_grad():
            rows = ours.image_features(pix["pixel_values"], pix["image_sizes"])
        assert rows.shape[0] == n


def test_bad_checkpoints_fail_with_one_line(tmp_path, tok):
    from safetensors.torch import load_file, save_file

    from vlmlab.errors import CheckpointError, ConfigError
    from vlmlab.registry import UnknownNameError

    hf, path = hf_model("llava_next_video", tok, tmp_path)
    # A sharded checkpoint with a shard missing.
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (sharded / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: shard listed in the index is missing") as e:
        vlmlab.from_pretrained(sharded)
    assert "\n" not in str(e.value)
    # A tensor of the wrong shape.
    weights = load_file(str(path / "model.safetensors"))
    save_file({**weights, "image_newline": torch.zeros(7)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mis-shaped.*image_newline: \\(7,\\) vs \\(32,\\)"):
        vlmlab.from_pretrained(path)
    save_file(weights, str(path / "model.safetensors"))
    # A pooling mode vlmlab does not implement, and a model type it does not know.
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "spatial_pool_mode": "conv"}))
    with pytest.raises(ConfigError, match="spatial_pool_mode 'conv' is not supported"):
        vlmlab.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_vl"}))
    with pytest.raises(UnknownNameError, match="qwen2_vl.*llava_next_video") as e:
        vlmlab.from_pretrained(path)
    assert "\n" not in str(e.value)


def test_load_a_transformers_directory_with_its_tokenizer_and_chat(tmp_path, tok):
    """``vlmlab.load`` (what ``vlmlab chat`` / ``eval`` use) takes a transformers directory with its tokenizer;
    the answer is transformers' greedy answer."""
    from vlmlab.inference.chat import answer

    hf, path = hf_model("llava_next", tok, tmp_path)
    tok.save_pretrained(path)
    model, proc = vlmlab.load(path)
    image = images(SIZES[:1])[0]
    reply = answer(model, proc, "What color is the shape?", images=[image], max_new_tokens=4)
    batch = proc([[{"role": "user", "content": "<image>\nWhat color is the shape?"}]], [[image]])
    batch.pop("labels")
    ref = hf.generate(**batch, max_new_tokens=4, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert reply == proc.decode(ref.tolist())
