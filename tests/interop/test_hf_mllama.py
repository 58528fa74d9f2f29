"""Parity with transformers' ``MllamaForConditionalGeneration`` (Llama-3.2-Vision) on a tiny random checkpoint built
offline: vlmlab imports it into its own composition (``mllama_vit`` tower -> ``linear`` connector -> a plain Llama
decoder with gated cross-attention blocks in front of its layers) and takes transformers' batch as it is
(``pixel_values`` ``[B, N_img, T, 3, H, W]`` with padding tiles and a padding image, ``aspect_ratio_ids``,
``aspect_ratio_mask``), deriving the cross-attention mask itself. Every gate is non-zero (vision and text), so the
cross-attention, the tile masks and Mllama's rule for rows that see no image all reach the logits."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError, SampleError
from vlmlab.models.fusion.cross import MediaState, media
from vlmlab.models.vlm import VisionLanguageModel

VOCAB, IMAGE = 128, 128  # <|image|> = vocab_size, the first of the 8 extra embedded ids
TILES, SIDE, ROWS = 4, 32, (32 // 8) ** 2 + 1  # rows per tile: patches + CLS
CROSS_LAYERS = [1, 4]  # of 6: self-attention layers 0, 2, 3, 5 -> vlmlab's 0..3, blocks in front of 1 and 3
ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)


def mllama_config(cross_layers=CROSS_LAYERS):
    return MllamaConfig(
        vision_config=dict(
            image_size=SIDE,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_global_layers=2,
            attention_heads=2,
            max_num_tiles=TILES,
            vision_output_dim=48,  # 16 x (1 + 2 intermediate layers)
            intermediate_layers_indices=[0, 2],
        ),
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=cross_layers,
            rope_parameters=ROPE,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=IMAGE,
    )


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' model (every gate random, not transformers' zeros) and its checkpoint directory."""
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(mllama_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.normal_()
    path = tmp_path_factory.mktemp("mllama") / "hf"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def ours(hf):
    return vlmlab.from_pretrained(hf[1]).eval()


def batch():
    """Left-padded prompts with text before the first image; sample 0 has one 3-tile image (and a padding image),
    sample 1 two adjacent images (4 and 2 tiles): padding tiles everywhere. Returns transformers' batch, the
    cross_attention_mask transformers' processor would add, and vlmlab's batch (the same without it)."""
    g = np.random.default_rng(0)
    image = lambda h, w: Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    images = [[image(30, 70)], [image(40, 40), image(64, 20)]]
    pix = MllamaImageProcessorPil(size={"height": SIDE, "width": SIDE}, max_image_tiles=TILES)(
        images=images, return_tensors="pt"
    )
    rows = [[1, 5, 6, IMAGE, 7, 8, 9], [1, 5, IMAGE, IMAGE, 7, 8, 9, 10, 11]]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    sparse = [get_cross_attention_token_mask(r, IMAGE) for r in ids.tolist()]
    cross = convert_sparse_cross_attention_mask_to_dense(sparse, pix["num_tiles"], TILES, T)
    b = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pix["pixel_values"],
        "aspect_ratio_ids": pix["aspect_ratio_ids"],
        "aspect_ratio_mask": pix["aspect_ratio_mask"],
    }
    assert pix["num_tiles"] == [[3], [4, 2]] and b["pixel_values"].shape == (2, 2, TILES, 3, SIDE, SIDE)
    return {**b, "cross_attention_mask": torch.from_numpy(cross)}, b


def test_import_builds_vlmlab_parts(ours):
    cfg = ours.config
    assert (cfg.vision.name, cfg.connector.name, cfg.language.model_type) == ("mllama_vit", "linear", "llama")
    lc = ours.language.config
    assert lc.num_hidden_layers == 4 and lc.vocab_size == VOCAB + 8
    assert lc.rope_parameters["rope_type"] == "llama3" and lc.rope_parameters["factor"] == 8.0
    assert sorted(ours.cross_attn) == ["1", "3"] and cfg.fusion.cross.layers == [1, 3]
    c = cfg.fusion.cross
    assert (c.kv_heads, c.qk_norm, c.empty_rows, c.group_consecutive) == (2, True, "zero_ff", True)
    assert ours.vision.hidden_size == 48 and ours.num_media_tokens == TILES * ROWS


def test_logits_and_greedy_generation_match_transformers(hf, ours):
    model, _ = hf
    ref_batch, b = batch()
    with torch.no_grad():
        ref, got = model(**ref_batch).logits, ours(**b).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(got[..., :VOCAB][real], ref[real], atol=1e-4, rtol=1e-4)
    extra = got[..., VOCAB:]  # the 8 extra embedded ids: their head rows are 0
    assert torch.equal(extra, torch.zeros_like(extra))
    # Text before the first image sees no image, but with Mllama's rule it attends to every row (padding included)
    # and only its FF is dropped: it differs from the text-only model's.
    with torch.no_grad():
        text_only = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(ref[0, 2:5], text_only[0, 2:5], atol=1e-3)  # 1, 5, 6 of sample 0
    T = b["input_ids"].shape[1]
    ref_gen = model.generate(**ref_batch, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert torch.equal(ours.generate(**b, max_new_tokens=6, eos_token_id=2, pad_token_id=0), ref_gen[:, T:])
    # transformers' batch as it is: its cross_attention_mask is accepted and not read (vlmlab derives the same).
    with torch.no_grad():
        assert torch.equal(ours(**ref_batch).logits, got)
    assert torch.equal(
        ours.generate(**ref_batch, max_new_tokens=6, eos_token_id=2, pad_token_id=0), ref_gen[:, T:]
    )


def test_vlmlab_media_mask_is_transformers_cross_attention_mask(ours):
    """group_consecutive over input_ids plus the tower's real rows (aspect_ratio_mask) give exactly the rows
    transformers' processor marks; every sample's images keep their slots, the padding image included."""
    ref_batch, b = batch()
    with torch.no_grad():
        feats, mask, valid = ours.cross_media(
            b["input_ids"],
            b["pixel_values"],
            aspect_ratio_ids=b["aspect_ratio_ids"],
            aspect_ratio_mask=b["aspect_ratio_mask"],
        )
    assert feats.shape == (2, 2, TILES * ROWS, 32) and valid.shape == (2, 2, TILES * ROWS)
    seen = mask.repeat_interleave(TILES * ROWS, dim=2) & valid.flatten(1)[:, None]
    want = ref_batch["cross_attention_mask"].bool().repeat_interleave(ROWS, dim=3).flatten(2)
    assert torch.equal(seen, want)


def test_text_only_equals_transformers_text_only(hf, ours):
    """No images: transformers skips its cross-attention layers, vlmlab's blocks do nothing."""
    model, _ = hf
    ids = torch.tensor([[1, 5, 6, 7, 8], [0, 1, 9, 10, 11]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[..., :VOCAB][mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_export_loads_in_transformers_with_the_same_logits(hf, ours, tmp_path):
    model, _ = hf
    ref_batch, b = batch()
    ours.save_pretrained(tmp_path / "out", format="hf")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mllama" and cfg["text_config"]["cross_attention_layers"] == CROSS_LAYERS
    back = MllamaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    want = model.state_dict()
    assert set(back.state_dict()) == set(want)
    assert all(torch.equal(t, want[k]) for k, t in back.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back(**ref_batch).logits, model(**ref_batch).logits, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "vl")  # and the vlmlab-format round trip keeps the same model
    again = vlmlab.from_pretrained(tmp_path / "vl").eval()
    with torch.no_grad():
        assert torch.equal(again(**b).logits, ours(**b).logits)


def test_hub_layout_imports_the_same(hf, ours, tmp_path):
    """transformers' in-memory tensor names and the hub's legacy config (rope_scaling + rope_theta) import alike."""
    model, path = hf
    (tmp_path / "hub").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "hub" / "model.safetensors"),
    )
    cfg = json.loads((path / "config.json").read_text())
    rope = dict(cfg["text_config"].pop("rope_parameters"))
    cfg["text_config"]["rope_theta"] = rope.pop("rope_theta")
    cfg["text_config"]["rope_scaling"] = rope
    (tmp_path / "hub" / "config.json").write_text(json.dumps(cfg))
    hub = vlmlab.from_pretrained(tmp_path / "hub").eval()
    assert hub.language.config.rope_parameters == ours.language.config.rope_parameters
    _, b = batch()
    with torch.no_grad():
        assert torch.equal(hub(**b).logits, ours(**b).logits)


def test_validity_mask_hides_padding_rows_from_tokens_that_see_the_unit():
    """``media(..., valid)``: a token sees the real rows of its units; a token that sees no real row attends to
    every row, padding included (Mllama), and is an empty row."""
    state = MediaState()
    state.features = torch.zeros(1, 6, 4)  # two units of three rows
    state.per_unit = 3
    state.mask = torch.tensor([[[False, False], [True, False], [True, True], [False, True]]])
    state.valid = torch.tensor([[True, True, False, False, False, False]])  # unit 1 is all padding
    state.select(0, 4, 1, torch.float32)
    attends = (state.bias[0, 0] == 0).int().tolist()
    assert attends == [[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]
    assert state.rows.flatten().tolist() == [0, 1, 1, 0]


def test_bad_checkpoints_and_inputs_fail_with_one_line(hf, ours, tmp_path):
    model, path = hf
    _, b = batch()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("language_model.model.layers.4.cross_attn.q_proj.weight")
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*cross_attn\.3\.attn\.q_proj\.weight") as e:
        vlmlab.from_pretrained(bad)
    assert "\n" not in str(e.value)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["cross_attention_layers"] = [1, 2]  # adjacent: no self-attention layer between them
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cross-attention layer 1 is followed by another") as e:
        vlmlab.from_pretrained(bad)
    assert "\n" not in str(e.value)
    # transformers' own validation: 2 tiles need their own supported_aspect_ratios
    cfg["vision_config"]["max_num_tiles"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="max_num_tiles must be 4") as e:
        vlmlab.from_pretrained(bad)
    assert "\n" not in str(e.value)
    # A model whose blocks transformers' Mllama cannot express.
    other = copy.deepcopy(ours.config)
    other.fusion.cross.empty_rows = "zero_attn"
    with pytest.raises(ConfigError, match="empty_rows='zero_attn'") as e:
        VisionLanguageModel(other, load_pretrained=False).save_pretrained(tmp_path / "x", format="hf")
    assert "\n" not in str(e.value)
    no_ratios = {k: v for k, v in b.items() if k != "aspect_ratio_ids"}
    with pytest.raises(SampleError, match="needs aspect_ratio_ids") as e:
        ours(**no_ratios)
    assert "\n" not in str(e.value)
    more = dict(b, input_ids=b["input_ids"].masked_fill(b["input_ids"] == 7, IMAGE))  # sample 1: 3 images
    with pytest.raises(SampleError, match=r"pixel_values \[2, 2\] has no slot for every image") as e:
        ours(**more)
    assert "\n" not in str(e.value)
    feats, seen = torch.zeros(2, 1, 3, 32), torch.ones(2, 4, 1, dtype=torch.bool)
    wrong = torch.ones(2, 1, 2, dtype=torch.bool)  # 2 rows per unit, the features have 3
    with (
        pytest.raises(SampleError, match="media valid must be") as e,
        media(ours.language.get_decoder(), feats, seen, wrong),
    ):
        pass
    assert "\n" not in str(e.value)
