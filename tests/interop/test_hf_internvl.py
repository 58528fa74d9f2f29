"""Parity with transformers' ``InternVLForConditionalGeneration`` (InternVL 1.5's structure: InternViT, pixel
shuffle, LN-MLP, dynamic tiles) on tiny random checkpoints built offline: vlmlab imports the checkpoint into its own
composition (``internvit`` + ``pixel_shuffle_mlp`` + decoder, weights mapped, not wrapped) and gives the same logits
and greedy generations on a padded batch of several images of several tiles each; its export loads back in
transformers with the same logits; vlmlab's processor makes ``InternVLProcessor``'s input ids and pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Qwen2Config,
)

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError, SampleError

IMAGE_TOKEN, IMG_START, IMG_END = 120, 121, 122
SIDE = 32  # tile side; 4 x 4 patches of 8 px -> 2 x 2 = 4 tokens per tile after the pixel shuffle
N_TOK = 4
TILES = (3, 2, 1)  # tiles of the batch's images: sample 0 has images 0 and 1, sample 1 has image 2


def text_config(kind: str):
    common = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def hf_internvl(tmp_path, text="qwen2", layer=-1, mean_pooling=True, seed=0):
    torch.manual_seed(seed)
    vc = InternVLVisionConfig(
        image_size=SIDE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        use_mean_pooling=mean_pooling,  # False: layer -1 goes through the final layernorm
    )
    cfg = InternVLConfig(
        vision_config=vc,
        text_config=text_config(text),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=N_TOK,
        vision_feature_layer=layer,
    )
    model = InternVLForConditionalGeneration(cfg).eval()
    # Random (not the zero/constant init) position embeddings, CLS and layer scales, so every weight matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" in name or "cls_token" in name or "lambda" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def batch(seed=1):
    """Two left-padded prompts: the first with two images (3 and 2 tiles), the second with one (1 tile); each
    image is ``<img>`` + 4 placeholders per tile + ``</img>``, as InternVLProcessor writes it."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    img = lambda tiles: [IMG_START] + [IMAGE_TOKEN] * N_TOK * tiles + [IMG_END]  # noqa: E731
    rows = [text(3) + img(TILES[0]) + text(2) + img(TILES[1]) + text(4), text(5) + img(TILES[2]) + text(3)]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    pixels = torch.randn(sum(TILES), 3, SIDE, SIDE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.mark.parametrize(
    "text,layer,mean_pooling", [("qwen2", -1, True), ("llama", -1, False), ("qwen2", 2, False)]
)
def test_import_matches_transformers_logits_and_generation(tmp_path, text, layer, mean_pooling):
    hf, path = hf_internvl(tmp_path, text, layer, mean_pooling)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.connector.name == "pixel_shuffle_mlp" and ours.num_image_tokens == N_TOK
    assert ours.config.processor.tiler == "dynamic"
    b = batch()
    with torch.no_grad():
        ref = hf(**b).logits
        got = ours(**b).logits
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    ref_gen = hf.generate(**b, max_new_tokens=6, do_sample=False)[:, b["input_ids"].shape[1] :]
    got_gen = ours.generate(**b, max_new_tokens=6)
    assert torch.equal(got_gen, ref_gen)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    hf, path = hf_internvl(tmp_path, "llama", mean_pooling=False)
    ours = vlmlab.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "internvl" and saved["downsample_ratio"] == 0.5
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, hf(**b).logits, atol=1e-5, rtol=1e-5)
    # And vlmlab reads its own export back.
    again = vlmlab.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, ours(**b).logits, atol=1e-6, rtol=1e-6)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_bad_input_fails_with_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, path = hf_internvl(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    # An unsupported vision feature strategy / downsample ratio / feature-layer list.
    for key, value, match in [
        ("vision_feature_select_strategy", "cls_only", "vision_feature_select_strategy 'cls_only'"),
        ("downsample_ratio", 0.3, "downsample_ratio 0.3"),
        ("vision_feature_layer", [-1, -2], "several layers"),
    ]:
        (path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConfigError, match=match) as e:
            vlmlab.from_pretrained(path)
        _one_line(e)
    (path / "config.json").write_text(json.dumps(cfg))
    # A mis-shaped tensor.
    weights = load_file(str(path / "model.safetensors"))
    bad = dict(weights)
    bad["multi_modal_projector.layer_norm.weight"] = torch.zeros(7)
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mis-shaped.*connector.layers.0.weight") as e:
        vlmlab.from_pretrained(path)
    _one_line(e)
    save_file(weights, str(path / "model.safetensors"))
    ours = vlmlab.from_pretrained(path).eval()
    b = batch()
    # Tiles of the wrong size, and fewer tiles than placeholders.
    with pytest.raises(SampleError, match=r"internvit: pixel_values must be \[N, 3, 32, 32\]") as e:
        ours(**{**b, "pixel_values": torch.randn(6, 3, 40, 40)})
    _one_line(e)
    with pytest.raises(SampleError) as e:
        ours(**{**b, "pixel_values": b["pixel_values"][:5]})
    _one_line(e)


def test_ps_version_v1_does_not_export(tmp_path):
    import dataclasses

    from vlmlab.models.vlm import VisionLanguageModel

    _, path = hf_internvl(tmp_path)
    ours = vlmlab.from_pretrained(path)
    cfg = ours.config
    v1 = dataclasses.replace(
        cfg, connector=dataclasses.replace(cfg.connector, params={"ratio": 2, "ps_version": "v1"})
    )
    with pytest.raises(ConfigError, match="transformers' pixel shuffle is v2, this model's is 'v1'") as e:
        VisionLanguageModel(v1, load_pretrained=False).save_pretrained(tmp_path / "v1", format="hf")
    _one_line(e)
    bad = dataclasses.replace(cfg, connector=dataclasses.replace(cfg.connector, params={"ps_version": "v3"}))
    with pytest.raises(ConfigError, match="ps_version 'v3' is not one of") as e:
        VisionLanguageModel(bad, load_pretrained=False)
    _one_line(e)


def _hf_processor(tok, max_patches, monkeypatch):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, ProcessorMixin

    # No torchvision here, so no video processor class to check a (absent) video processor against.
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)

    ip = GotOcr2ImageProcessor(
        size={"height": SIDE, "width": SIDE}, crop_to_patches=True, min_patches=1, max_patches=max_patches
    )
    return InternVLProcessor(image_processor=ip, tokenizer=tok, image_seq_length=N_TOK), ip


def test_processor_matches_internvl_processor(tmp_path, monkeypatch):
    """vlmlab's processor (dynamic tiler, ``<img>``/``</img>`` wrapping) makes InternVLProcessor's input ids and
    pixel values for images of several aspect ratios, and the imported model then gives transformers' logits."""
    from tests.conftest import TEXTS

    from vlmlab.processing.processor import Processor
    from vlmlab.processing.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(
        TEXTS, vocab_size=320, extra_special_tokens=("<img>", "</img>", "<IMG_CONTEXT>")
    )
    tok.padding_side = "left"
    # The attributes InternVL's hub tokenizers carry.
    tok.start_image_token, tok.end_image_token, tok.context_image_token = "<img>", "</img>", "<IMG_CONTEXT>"
    tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id = tok.convert_tokens_to_ids(
        ["<img>", "</img>", "<IMG_CONTEXT>"]
    )
    tok.video_token = "<video>"
    hf, path = hf_internvl(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["image_token_id"] = tok.context_image_token_id
    cfg["text_config"]["vocab_size"] = len(tok)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    hf = InternVLForConditionalGeneration(InternVLConfig.from_pretrained(path)).eval()
    hf.save_pretrained(path)
    ref_proc, ip = _hf_processor(tok, max_patches=6, monkeypatch=monkeypatch)
    ip.save_pretrained(path)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.processor.tiler_params == {"min_tiles": 1, "max_tiles": 6, "thumbnail": True}
    proc = Processor(tok, ours.config.processor, ours.num_image_tokens)
    rng = np.random.default_rng(0)
    ims = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in [(70, 30), (40, 90), (33, 31)]
    ]
    from vlmlab.processing.chat import render_with_spans

    convs = [
        [{"role": "user", "content": "<IMG_CONTEXT>\nWhat color is the shape?"}],
        [{"role": "user", "content": "a <IMG_CONTEXT> b <IMG_CONTEXT> shapes"}],
    ]
    texts = [render_with_spans(tok, c, True)[0] for c in convs]
    ref = ref_proc(images=ims, text=texts, return_tensors="pt", padding=True)
    for conv, images, want, m in zip(convs, ([ims[0]], ims[1:]), ref["input_ids"], ref["attention_mask"]):
        got = proc.encode(conv, images, add_generation_prompt=True)["input_ids"]
        assert got.tolist() == want[m.bool()].tolist()
    # Token counts: InternVLProcessor's own count (placeholders + <img> + </img>) for each image size.
    mm = ref_proc._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in ims])
    assert [n + 2 for n in proc.image_token_counts(ims)] == mm.num_image_tokens
    our_pixels = proc.encode_visuals(ims)["pixel_values"]
    assert torch.equal(our_pixels, ref["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**{k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits,
            hf(**{k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits,
            atol=1e-4,
            rtol=1e-4,
        )


# -- presets (SYSTEMS.md §18 (b), §10 (b)) -------------------------------------------------------------------


def _trainable_parts(model, stage):
    from vlmlab.training.stages import apply_stage

    apply_stage(model, stage)
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_real_scale_presets_have_the_papers_numbers():
    from vlmlab.models.vlm import VisionLanguageModel
    from vlmlab.presets import PRESETS

    internvl, vila = PRESETS["internvl-1.5"](), PRESETS["vila-1.5"]()
    with torch.device("meta"):
        a = VisionLanguageModel(internvl.config, load_pretrained=False)
        b = VisionLanguageModel(vila.config, load_pretrained=False)
    assert a.vision.num_tokens == 1024 and a.num_image_tokens == 256  # 32 x 32 patches -> 16 x 16
    assert 5.4e9 < sum(p.numel() for p in a.vision.parameters()) < 5.6e9  # InternViT-6B-448px-V1.5
    assert 19e9 < sum(p.numel() for p in a.language.parameters()) < 20e9  # InternLM2-20B's shape
    c, d = 3200, 6144
    assert sum(p.numel() for p in a.connector.parameters()) == 2 * 4 * c + 4 * c * d + d + d * d + d
    assert a.config.connector.params == {"ratio": 2, "ps_version": "v1"}
    assert [_trainable_parts(a, s) for s in internvl.recipe] == [
        {"vision", "connector"},
        {"vision", "connector", "language"},
    ]
    assert b.vision.num_tokens == 729 and b.num_image_tokens == 196  # 27 x 27 padded to 28 x 28, then 2 x 2
    assert 7.9e9 < sum(p.numel() for p in b.language.parameters()) < 8.1e9  # Llama-3-8B
    assert [_trainable_parts(b, s) for s in vila.recipe] == [
        {"connector"},
        {"connector", "language"},
        {"connector", "language"},
    ]
    for preset in (internvl, vila):
        with pytest.raises(ConfigError, match="language.pretrained"):
            preset.make_tokenizer()


def test_internvl_tiny_builds_trains_its_stages_and_exports_to_transformers(tmp_path):
    from vlmlab.presets import PRESETS

    model, proc = vlmlab.build("internvl-1.5-tiny")
    preset = PRESETS["internvl-1.5-tiny"]()
    assert model.num_image_tokens == 16  # 64 px / 8 = 8 x 8 tokens, pixel-shuffled to 4 x 4
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    image = Image.new("RGB", (96, 48), "red")  # (2, 1) tiles + thumbnail
    sample = proc.encode(conv, [image], train=True)
    ids = sample["input_ids"].tolist()
    start, end = proc.image_start_ids[0], proc.image_end_ids[0]
    first = ids.index(start)
    assert ids[first + 1 : first + 1 + 48] == [model.config.image_token_id] * 48 and ids[first + 49] == end
    assert sample["pixel_values"].shape == (3, 3, 64, 64)
    b = proc.collate([sample, proc.encode(conv, [Image.new("RGB", (60, 60), "blue")], train=True)])
    assert torch.isfinite(model(**b).loss)
    assert [_trainable_parts(model, s) for s in preset.recipe] == [
        {"vision", "connector"},
        {"vision", "connector", "language"},
    ]
    model.eval().save_pretrained(tmp_path / "hf", format="hf")
    back = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    keep = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        ref = back(**{k: b[k] for k in keep}).logits
        got = model(**{k: b[k] for k in keep}).logits
    real = b[
        "attention_mask"
    ].bool()  # right padding: pad rows' positions differ (vlmlab derives them from the mask)
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_vila_tiny_builds_with_an_odd_grid_and_three_stages():
    from vlmlab.presets import PRESETS

    model, proc = vlmlab.build("vila-1.5-tiny")
    preset = PRESETS["vila-1.5-tiny"]()
    assert model.vision.num_tokens == 81 and model.num_image_tokens == 25  # 9 x 9 -> padded 10 x 10 -> 5 x 5
    conv = [
        {"role": "user", "content": "<image>\nWhat shape is this?"},
        {"role": "assistant", "content": "circle"},
    ]
    b = proc.collate([proc.encode(conv, [Image.new("RGB", (90, 50), "red")], train=True)])
    assert (b["input_ids"] == model.config.image_token_id).sum() == 25
    assert torch.isfinite(model(**b).loss)
    assert [s.name for s in preset.recipe] == ["align", "pretrain", "sft"]
    assert [_trainable_parts(model, s) for s in preset.recipe] == [
        {"connector"},
        {"connector", "language"},
        {"connector", "language"},
    ]
