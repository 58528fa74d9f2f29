"""Import of the original LLaVA repository's layout (``llava_llama``: a Llama checkpoint + ``model.mm_projector``,
the vision tower read from ``mm_vision_tower``) against transformers' conversion of the same weights
(``LlavaForConditionalGeneration``): same logits, same greedy tokens."""

import json

import pytest
import torch
from safetensors.torch import save_file

import vlmlab
from vlmlab.errors import CheckpointError

from .test_hf_llava import IMAGE_TOKEN, N_TOK, batch, hf_llava

ORIGINAL = -200  # IMAGE_TOKEN_INDEX of haotian-liu/LLaVA


def write_original_layout(hf, tmp_path):
    """The original repository's files for the weights of ``hf`` (the reverse of transformers' conversion)."""
    tower = tmp_path / "clip-tower"
    hf.model.vision_tower.save_pretrained(tower)
    out = tmp_path / "llava-v1.5"
    out.mkdir()
    renames = [
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ]
    state = {}
    for k, v in hf.state_dict().items():
        for src, dst in renames:
            if k.startswith(src):
                state[dst + k[len(src) :]] = v.clone()
    save_file(state, str(out / "model.safetensors"))
    cfg = hf.config.text_config.to_dict()
    cfg.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=str(tower),
        mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
    )
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_original_layout_matches_the_transformers_conversion(tmp_path):
    hf, _ = hf_llava(tmp_path)
    path = write_original_layout(hf, tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.image_token_id == ORIGINAL and ours.config.processor.pad_to_square
    b = batch()
    ours_batch = dict(b, input_ids=b["input_ids"].masked_fill(b["input_ids"] == IMAGE_TOKEN, ORIGINAL))
    assert int((ours_batch["input_ids"] == ORIGINAL).sum()) == 3 * N_TOK
    with torch.no_grad():
        ref = hf(**b).logits
        got = ours(**ours_batch).logits
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    ref_gen = hf.generate(**b, max_new_tokens=5, do_sample=False)[:, b["input_ids"].shape[1] :]
    assert torch.equal(ours.generate(**ours_batch, max_new_tokens=5), ref_gen)


def test_a_hub_id_as_vision_tower_is_a_clear_error(tmp_path):
    hf, _ = hf_llava(tmp_path)
    path = write_original_layout(hf, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336.*not a local directory"):
        vlmlab.from_pretrained(path)


def test_original_llava_next_layout_matches_the_transformers_conversion(tmp_path):
    """A LLaVA-1.6 checkpoint of the original layout (anyres, spatial_unpad, ``model.image_newline``, pinpoints
    as (width, height)) gives the logits of its transformers ``llava_next`` conversion."""
    from tests.conftest import TEXTS
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlmlab.processing.tokenizer import train_bpe_tokenizer

    from .test_hf_llava_next import PINPOINTS, SIZES, hf_model, images

    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=["<video>"])
    hf, _ = hf_model("llava_next", tok, tmp_path)
    path = write_original_layout(hf, tmp_path)
    state = vlmlab.interop.hf.convert.read_hf_tensors(path)
    state["model.image_newline"] = hf.model.image_newline.detach().clone()
    save_file(state, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[w, h] for h, w in PINPOINTS],
    )
    (path / "config.json").write_text(json.dumps(cfg))
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.processor.anyres.grid_pinpoints == PINPOINTS
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    ims = images(SIZES[:2])
    pix = ip(ims, return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<image>")
    counts = [
        vlmlab.models.tiling.anyres.num_tokens((im.height, im.width), ours.config.processor.anyres, 32, 4)
        for im in ims
    ]
    ids = torch.tensor([[7, 8] + [image_id] * counts[0] + [9] + [image_id] * counts[1] + [10, 11]])
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pix}
    with torch.no_grad():
        ref = hf(**b).logits
        got = ours(**dict(b, input_ids=ids.masked_fill(ids == image_id, ORIGINAL))).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
