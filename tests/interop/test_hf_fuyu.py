"""Parity with transformers' ``FuyuForCausalLM`` and ``FuyuProcessor`` on tiny random checkpoints built offline:
vlmlab imports them into its own composition (``fuyu_patches`` tower -> ``linear`` connector -> the Persimmon
decoder as a transformers causal LM, ``fuyu`` tiler); on transformers' own processed inputs (``input_ids`` and the
flattened patches, turned into views by ``batch_from_hf``) logits and greedy generations must match; vlmlab's
processor must give transformers' image token layout and patches for images of any size; exported checkpoints
load in transformers with the same logits.

The tokenizer is a character-level one built to behave like Fuyu's SentencePiece tokenizer where
``FuyuProcessor`` relies on it: ``|SPEAKER|`` and ``|NEWLINE|`` are vocabulary pieces and text starts with a
``"▁"`` piece, which ``FuyuProcessor`` strips in front of the image tokens. The image processor is transformers'
PIL backend (the default torchvision one is not installed here), with its ``patchify_image`` given a tensor's
numpy view: transformers 5.24's ``FuyuProcessor`` hands it torch tensors, which its numpy reshape cannot take."""

from __future__ import annotations

import dataclasses
import json
import re
import string

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor, PreTrainedTokenizerFast
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

import vlmlab
from vlmlab.config import ConnectorConfig
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.interop.hf import fuyu
from vlmlab.interop.hf.fuyu import batch_from_hf
from vlmlab.models.vlm import VisionLanguageModel

P = 8
MAX = {"height": 48, "width": 64}
SPECIALS = ["<unk>", "<pad>", "|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|", "<s>", "<0x04>"]
# (height, width): several aspect ratios, within the limit, on it, and above it in either direction.
SIZES = [(20, 30), (48, 64), (17, 9), (100, 50), (50, 200), (97, 131), (8, 8), (63, 11)]


def fuyu_tokenizer() -> PreTrainedTokenizerFast:
    vocab = SPECIALS + ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    pieces = "|".join(re.escape(s) for s in SPECIALS[2:]) + "|."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="|ENDOFTEXT|"
    )


class ImageProcessor(FuyuImageProcessorPil):
    def patchify_image(self, image, patch_size=None):
        return torch.from_numpy(super().patchify_image(image.numpy(), patch_size))


def hf_processor() -> FuyuProcessor:
    return FuyuProcessor(
        image_processor=ImageProcessor(size=MAX, patch_size={"height": P, "width": P}),
        tokenizer=fuyu_tokenizer(),
    )


def text_config(model_type: str = "persimmon") -> dict:
    common = dict(vocab_size=len(SPECIALS) + 95, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    if model_type == "persimmon":
        return dict(model_type="persimmon", num_attention_heads=4, max_position_embeddings=512, **common)
    return dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, **common)


def hf_fuyu(tmp_path, text: str = "persimmon", tie: bool = False) -> tuple[FuyuForCausalLM, object]:
    torch.manual_seed(0)
    cfg = FuyuConfig(
        text_config=text_config(text),
        patch_size=P,
        image_token_id=SPECIALS.index("|SPEAKER|"),
        tie_word_embeddings=tie,
    )
    model = FuyuForCausalLM(cfg).eval()
    path = tmp_path / "hf"
    model.save_pretrained(path)
    proc = hf_processor()
    proc.image_processor.save_pretrained(path)
    fuyu_tokenizer().save_pretrained(path)
    return model, path


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_batch(sizes=((20, 30), (97, 131)), texts=("red color", "what shape is it")) -> dict:
    """``FuyuProcessor``'s left-padded batch: one image per prompt (the second larger than the limit)."""
    images = [noise(h, w, i) for i, (h, w) in enumerate(sizes)]
    return hf_processor()(
        images=images, text=list(texts), return_tensors="pt", return_legacy_image_output=False
    )


def hf_logits(model, b: dict) -> torch.Tensor:
    """transformers' logits; positions from the mask (``FuyuModel`` defaults to ``arange``, ignoring left
    padding; ``generate`` derives them from the mask, as vlmlab always does)."""
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**b, position_ids=pos).logits


def assert_parity(hf, ours, b: dict) -> None:
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        got = ours(**batch_from_hf(b, P)).logits
    torch.testing.assert_close(got[mask], hf_logits(hf, b)[mask], atol=1e-4, rtol=1e-4)
    ref = hf.generate(**b, max_new_tokens=6, do_sample=False)[:, b["input_ids"].shape[1] :]
    assert torch.equal(ours.generate(**batch_from_hf(b, P), max_new_tokens=6), ref)


def test_import_matches_transformers_logits_and_generation(tmp_path):
    hf, path = hf_fuyu(tmp_path)
    ours, proc = vlmlab.load(path)
    ours.eval()
    c = ours.config
    assert (c.vision.name, c.connector.name, c.language.model_type, c.processor.tiler) == (
        "fuyu_patches",
        "linear",
        "persimmon",
        "fuyu",
    )
    assert c.processor.tiler_params == {
        "max_height": 48,
        "max_width": 64,
        "newline": "|NEWLINE|",
        "pad_value": 1,
    }
    assert proc.image_token_id == c.image_token_id == hf.config.image_token_id
    assert_parity(hf, ours, hf_batch())


def test_llama_decoder_with_a_tied_head(tmp_path):
    """``text_config`` may be any causal LM: a Llama whose head is tied by Fuyu's top-level flag."""
    hf, path = hf_fuyu(tmp_path, text="llama", tie=True)
    ours = vlmlab.from_pretrained(path).eval()
    lm = ours.language
    assert lm.config.model_type == "llama"
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert_parity(hf, ours, hf_batch())


def test_processor_layout_and_patches_equal_transformers(tmp_path):
    """For each size, vlmlab's image token ids equal the image part of ``FuyuProcessor``'s ``input_ids`` (after
    its stripped "▁"), the placeholder count is ``image_token_counts``, and the patches are transformers' (the
    PIL backend resizes with Pillow's bilinear filter, as vlmlab does)."""
    _, path = hf_fuyu(tmp_path)
    _, proc = vlmlab.load(path)
    ref = hf_processor()
    for seed, (h, w) in enumerate(SIZES):
        image = noise(h, w, seed)
        b = ref(images=image, text="red", return_tensors="pt", return_legacy_image_output=False)
        ids = b["input_ids"][0].tolist()
        (layout,) = proc.image_token_layouts([image])
        assert ids[: len(layout)] == layout and ids[len(layout)] == ref.tokenizer.convert_tokens_to_ids("<s>")
        assert proc.image_token_counts([image]) == [layout.count(proc.image_token_id)]
        ours = proc.encode_visuals([image])["pixel_values"]
        torch.testing.assert_close(ours, batch_from_hf(b, P)["pixel_values"], atol=1e-6, rtol=0)


def test_export_round_trip(tmp_path):
    hf, path = hf_fuyu(tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    out = tmp_path / "export"
    ours.save_pretrained(out, format="hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["FuyuForCausalLM"]
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(path / "model.safetensors")))
    back = FuyuForCausalLM.from_pretrained(out).eval()
    b = hf_batch()
    torch.testing.assert_close(hf_logits(back, b), hf_logits(hf, b), atol=1e-5, rtol=1e-5)
    again = vlmlab.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch_from_hf(b, P)).logits, ours(**batch_from_hf(b, P)).logits)


def test_fuyu_tiny_exports_to_transformers(tmp_path):
    """The CPU preset (Llama decoder, tied head, ``<image>`` placeholder) exports to ``FuyuForCausalLM`` with the
    same logits, and loads back with its placeholder read from the tokenizer beside it."""
    model, proc = vlmlab.build("fuyu-tiny")
    model.eval()
    conv = [{"role": "user", "content": "<image>\nWhat color is the shape?"}]
    batch = proc([conv, conv], [[noise(40, 90, 0)], [noise(70, 50, 1)]])
    model.save_pretrained(tmp_path, format="hf")
    proc.tokenizer.save_pretrained(tmp_path)
    hf = FuyuForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings and hf.config.image_token_id == proc.image_token_id
    patches = model.vision(batch["pixel_values"])[:, 0]  # transformers' flattened patches
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**batch).logits
        ref = hf_logits(
            hf,
            {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "pixel_values": patches,
            },
        )
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    again, proc2 = vlmlab.load(tmp_path)
    assert proc2.config.image_token == "<image>" and proc2.image_token_id == proc.image_token_id


def test_bad_checkpoints_and_exports_give_one_line_errors(tmp_path):
    hf, path = hf_fuyu(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    pre = json.loads((path / "preprocessor_config.json").read_text())
    cases = [
        (ConfigError, "num_channels", lambda: fuyu.config_from_hf({**cfg, "num_channels": 1})),
        (
            ConfigError,
            "patch_size",
            lambda: fuyu.config_from_hf(cfg, {**pre, "patch_size": {"height": 16, "width": 16}}),
        ),
        (ConfigError, "padding_mode", lambda: fuyu.config_from_hf(cfg, {**pre, "padding_mode": "reflect"})),
    ]
    ours = vlmlab.from_pretrained(path)
    other = VisionLanguageModel(
        dataclasses.replace(ours.config, connector=ConnectorConfig(name="mlp2x_gelu"))
    )
    untiled = VisionLanguageModel(
        dataclasses.replace(ours.config, processor=dataclasses.replace(ours.config.processor, tiler=None))
    )
    cases += [
        (ConfigError, "the linear connector", lambda: other.save_pretrained(tmp_path / "x", "hf")),
        (ConfigError, "and the fuyu tiler", lambda: untiled.save_pretrained(tmp_path / "y", "hf")),
    ]
    state = load_file(str(path / "model.safetensors"))
    del state["vision_embed_tokens.bias"]
    save_file(state, str(path / "model.safetensors"))
    cases.append((CheckpointError, "missing", lambda: vlmlab.from_pretrained(path)))
    for error, match, call in cases:
        with pytest.raises(error, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_no_preprocessor_config_means_transformers_defaults(tmp_path):
    _, path = hf_fuyu(tmp_path)
    (path / "preprocessor_config.json").unlink()
    c = vlmlab.from_pretrained(path).config.processor
    assert (c.image_size, c.image_mean, c.image_std) == (P, (0.5,) * 3, (0.5,) * 3)
    assert (c.tiler_params["max_height"], c.tiler_params["max_width"]) == (1080, 1920)
