"""Parity with transformers' ``IdeficsForVisionText2Text`` (Idefics v1) on tiny random checkpoints built offline:
vlmlab imports them into its own composition (Idefics' CLIP tower -> perceiver or nothing -> Llama decoder with
gated cross-attention blocks hooked in), takes transformers' batch as it is (left padding, ``pixel_values``
``[B, N_img, 3, S, S]`` padded with all-zero images) and computes ``image_attention_mask`` itself; logits, greedy
generations and the exported checkpoint must match transformers'. The gates are non-zero, so the images count."""

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids_pt,
    incremental_to_binary_attention_mask,
)

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.models.fusion.cross import media_mask

PAD, BOS, EOS = 0, 1, 2
VOCAB = 100  # + 2 additional tokens (transformers' decoupled embedding and head), as in Idefics' checkpoints
FAKE, IMAGE = VOCAB, VOCAB + 1
SIDE = 16

# (alpha_type, cross_layer_interval, layers, use_resampler, qk norms, tied LM head)
SETTINGS = {
    "float-resampler": ("float", 2, 4, True, True, False),
    "vector-no-resampler": ("vector", 1, 2, False, False, True),
}


def hf_idefics(tmp_path, setting):
    alpha_type, interval, layers, resampler, qk_norms, tied = SETTINGS[setting]
    torch.manual_seed(0)
    cfg = IdeficsConfig(
        vocab_size=VOCAB,
        additional_vocab_size=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        cross_layer_interval=interval,
        alpha_type=alpha_type,
        qk_layer_norms=qk_norms,
        tie_word_embeddings=tied,
        use_resampler=resampler,
        vision_config=dict(
            embed_dim=24,
            image_size=SIDE,
            patch_size=8,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        perceiver_config=dict(
            use_resampler=resampler,
            resampler_n_latents=3,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=8,
            qk_layer_norms_perceiver=qk_norms,
        ),
        image_token_index=IMAGE,
    )
    model = IdeficsForVisionText2Text(cfg).eval()
    # Non-zero gates (transformers' alpha_initializer="normal" fails for alpha_type="float": torch.normal(size=1)).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".alpha_" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def image_attention_mask(ids, n_images):
    """transformers' processor mask (``IdeficsProcessor.__call__``): ``[B, T, n_images]``."""
    tok = types.SimpleNamespace(convert_tokens_to_ids=lambda t: IMAGE, eos_token_id=EOS)
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids.clone(), tok)
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=n_images)


def batch(seed=1):
    """Two left-padded prompts as transformers' processor lays them out: one image; two images with an EOS
    (end of document) between them. The second image slot of the first row is all-zero padding. ``seed`` draws
    the images; the text is fixed."""
    g = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    img = [FAKE, IMAGE, FAKE]
    rows = [
        [BOS, *text(2), *img, *text(3)],
        [BOS, *text(1), *img, *text(2), EOS, *text(2), *img, *text(2)],
    ]
    T = max(map(len, rows))
    ids = torch.full((2, T), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    pv = torch.randn(2, 2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    pv[0, 1] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


def test_media_mask_equals_transformers_processor_mask():
    """vlmlab's media mask (latest image, Idefics' EOS reset) is transformers' ``image_attention_mask``."""
    t = 7
    rows = [
        [t, IMAGE, t, t, EOS, t, IMAGE, t, EOS, EOS, t, IMAGE, IMAGE, t],  # resets, consecutive images
        [PAD, PAD, EOS, t, IMAGE, t, EOS, IMAGE, t, t, t, EOS, t, IMAGE],  # EOS right before an image, last
        [PAD, t, t, t, t, t, t, t, t, t, t, t, EOS, t],  # no image
        [IMAGE, EOS, IMAGE, EOS, IMAGE, EOS, t, t, t, t, t, t, t, t],
    ]
    ids = torch.tensor(rows)
    ours = media_mask(ids, IMAGE, reset_token_id=EOS)
    assert ours.shape == (4, 14, 4)
    assert torch.equal(ours, image_attention_mask(ids, 4).bool())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_import_matches_transformers_logits_and_generation(tmp_path, setting):
    hf, path = hf_idefics(tmp_path, setting)
    ours = vlmlab.from_pretrained(path).eval()
    alpha_type, interval, layers, resampler, qk_norms, _ = SETTINGS[setting]
    cross = ours.config.fusion.cross
    assert (cross.gate, cross.qk_norm, cross.reset_token_id) == (
        {"float": "scalar", "vector": "vector"}[alpha_type],
        qk_norms,
        EOS,
    )
    assert sorted(map(int, ours.cross_attn)) == list(range(0, layers, interval))
    assert ours.config.connector.name == ("perceiver" if resampler else "identity")
    assert ours.language.config.vocab_size == VOCAB + 2
    b = batch()
    iam = image_attention_mask(b["input_ids"], 2)
    mask = ours.cross_media(b["input_ids"], b["pixel_values"])[1]
    assert torch.equal(mask, iam.bool())
    real = b["attention_mask"].bool()
    with torch.no_grad():
        ref = hf(**b, image_attention_mask=iam).logits
        got = ours(**b).logits
        other = ours(**dict(b, pixel_values=batch(seed=2)["pixel_values"])).logits
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)
    # The images count (non-zero gates) for the tokens that see them, and for no token before the first image.
    assert not torch.allclose(other[real], got[real], atol=1e-3)
    first = (b["input_ids"] == IMAGE).long().argmax(1)
    for i in range(2):
        torch.testing.assert_close(other[i, : first[i]], got[i, : first[i]], atol=0, rtol=0)
    ref_gen = hf.generate(**b, image_attention_mask=iam, max_new_tokens=6, do_sample=False)
    ref_gen = ref_gen[:, b["input_ids"].shape[1] :]
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ours.generate(**b, **kw), ref_gen)
    assert torch.equal(ours.generate(**b, **kw, use_cache=False), ref_gen)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, setting):
    hf, path = hf_idefics(tmp_path, setting)
    ours = vlmlab.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["model_type"], d["image_token_index"], d["additional_vocab_size"]) == ("idefics", IMAGE, 2)
    # The same tensors under the same names (decoupled embedding and head split back, blocks renumbered).
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load_file(str(path / "model.safetensors"))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    back = IdeficsForVisionText2Text.from_pretrained(tmp_path / "out").eval()
    b = batch()
    iam = image_attention_mask(b["input_ids"], 2)
    with torch.no_grad():
        torch.testing.assert_close(
            back(**b, image_attention_mask=iam).logits, hf(**b, image_attention_mask=iam).logits
        )
    # And the vlmlab-format round trip keeps the same model.
    ours.save_pretrained(tmp_path / "vl")
    again = vlmlab.from_pretrained(tmp_path / "vl").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, ours(**b).logits)


def test_bad_checkpoints_and_configs_fail_with_one_line(tmp_path):
    from vlmlab.models.vlm import VisionLanguageModel

    _, path = hf_idefics(tmp_path, "float-resampler")
    ours = vlmlab.from_pretrained(path)
    weights = load_file(str(path / "model.safetensors"))
    for drop, match in [
        ("model.gated_cross_attn_layers.1.alpha_dense", "missing tensor.*cross_attn.2.ff_gate"),
        (
            "model.perceiver_resampler.blocks.0.1.fc.weight",
            "missing tensor.*connector.perceiver.layers.0.mlp.fc1",
        ),
    ]:
        save_file({k: v for k, v in weights.items() if k != drop}, str(path / "model.safetensors"))
        with pytest.raises(CheckpointError, match=match) as e:
            vlmlab.from_pretrained(path)
        assert "\n" not in str(e.value)
    extra = {**weights, "model.gated_cross_attn_layers.0.gate": torch.zeros(1)}
    save_file(extra, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.gated_cross_attn_layers.0.gate'"):
        vlmlab.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    del config["image_token_index"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="image_token_index") as e:
        vlmlab.from_pretrained(path)
    assert "\n" not in str(e.value)
    # A real checkpoint keeps the id in its tokenizer: read from tokenizer_config.json's added tokens.
    added = {str(IMAGE): {"content": "<image>", "special": True}}
    (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    save_file(weights, str(path / "model.safetensors"))
    assert vlmlab.from_pretrained(path).config.image_token_id == IMAGE
    # A model transformers' Idefics cannot express refuses to export, naming the field.
    cfg = ours.config
    cfg.fusion.cross.reset_token_id = -1
    with pytest.raises(ConfigError, match="reset_token_id") as e:
        VisionLanguageModel(cfg, load_pretrained=False).save_pretrained(tmp_path / "x", format="hf")
    assert "\n" not in str(e.value)
