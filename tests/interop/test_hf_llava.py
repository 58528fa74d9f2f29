"""Parity with transformers' ``LlavaForConditionalGeneration`` on tiny random checkpoints built offline: vlmlab
imports the checkpoint into its own composition (weights mapped, not wrapped) and must give the same logits and
the same greedy generations; its export must load back in transformers with the same logits."""

import json

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmlab
from vlmlab.errors import CheckpointError
from vlmlab.registry import UnknownNameError

IMAGE_TOKEN = 120
N_TOK = 16  # (32 / 8) ** 2 patches, CLS dropped


def hf_llava(tmp_path, strategy="default", layer=-2, seed=0):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    tc = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        image_seq_length=N_TOK + (strategy == "full"),
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def batch(n_tok=N_TOK, seed=1):
    """Two prompts, left-padded; the first has two images, the second one."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    img = [IMAGE_TOKEN] * n_tok
    rows = [text(3) + img + text(2) + img + text(4), text(5) + img + text(3)]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1), ("default", 1)])
def test_import_matches_transformers_logits_and_generation(tmp_path, strategy, layer):
    hf, path = hf_llava(tmp_path, strategy, layer)
    ours = vlmlab.from_pretrained(path).eval()
    b = batch(N_TOK + (strategy == "full"))
    with torch.no_grad():
        ref = hf(**b).logits
        got = ours(**b).logits
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    ref_gen = hf.generate(**b, max_new_tokens=6, do_sample=False)[:, b["input_ids"].shape[1] :]
    got_gen = ours.generate(**b, max_new_tokens=6)
    assert torch.equal(got_gen, ref_gen)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    hf, path = hf_llava(tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, hf(**b).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava"


def test_stage1_trainable_set_is_exactly_the_projector(tmp_path):
    from vlmlab.training.stages import Stage, apply_stage

    _, path = hf_llava(tmp_path)
    ours = vlmlab.from_pretrained(path)
    groups = apply_stage(ours, Stage(name="align", train=("connector",), lr={"connector": 1e-3}, steps=1))
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == 32 * 32 + 32 + 32 * 32 + 32  # linear_1 + linear_2 (1024 -> d, d -> d in the real model)
    assert {name for name, p in ours.named_parameters() if p.requires_grad} == {
        "connector.layers.0.weight",
        "connector.layers.0.bias",
        "connector.layers.2.weight",
        "connector.layers.2.bias",
    }


def test_bad_checkpoints_fail_with_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_llava(tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    # A missing tensor.
    missing = dict(weights)
    missing.pop("multi_modal_projector.linear_2.bias")
    save_file(missing, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*connector.layers.2.bias") as e:
        vlmlab.from_pretrained(path)
    assert "\n" not in str(e.value)
    # A mis-shaped tensor.
    bad = dict(weights)
    bad["multi_modal_projector.linear_2.bias"] = torch.zeros(7)
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        vlmlab.from_pretrained(path)
    # An unexpected tensor.
    extra = dict(weights)
    extra["something_else.weight"] = torch.zeros(2)
    save_file(extra, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'something_else.weight'"):
        vlmlab.from_pretrained(path)
    # An unsupported model type.
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "paligemma"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownNameError, match="paligemma.*llava"):
        vlmlab.from_pretrained(path)


def test_imported_preprocessing_matches_the_checkpoints_image_processor(tmp_path):
    """With the checkpoint's preprocessor_config.json, vlmlab's pixels (and so its logits) equal transformers'."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from vlmlab.processing.transforms import image_to_tensor

    hf, path = hf_llava(tmp_path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(path)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.processor.resize == "shortest_edge_crop" and ours.config.processor.image_size == 32
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(50, 30), (20, 90)]
    ]
    ref_pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    our_pixels = torch.stack([image_to_tensor(im, ours.config.processor) for im in images])
    assert torch.equal(our_pixels, ref_pixels)
    b = batch()
    b["pixel_values"] = torch.cat([ref_pixels, ref_pixels[:1]])
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, hf(**b).logits, atol=1e-4, rtol=1e-4)


def test_processor_matches_llava_processor(tmp_path):
    """vlmlab's processor makes the input_ids and pixel_values of transformers' LlavaProcessor (several images
    per prompt, different aspect ratios, left padding), and the imported model then gives its logits."""
    import numpy as np
    from PIL import Image
    from tests.conftest import TEXTS
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vlmlab.processing.processor import Processor
    from vlmlab.processing.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS, vocab_size=320)
    tok.padding_side = "left"
    hf, path = hf_llava(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    cfg["text_config"]["vocab_size"] = len(tok)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(path)).eval()
    hf.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_processor.save_pretrained(path)
    ours = vlmlab.from_pretrained(path).eval()
    proc = Processor(tok, ours.config.processor, ours.num_image_tokens)
    ref_proc = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    rng = np.random.default_rng(0)
    ims = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in [(50, 30), (20, 90), (33, 33)]
    ]
    convs = [
        [{"role": "user", "content": "<image>\n<image>\nWhich image has more shapes?"}],
        [{"role": "user", "content": "<image>\nWhat color is the shape?"}],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    ref = ref_proc(images=ims, text=texts, padding=True, return_tensors="pt")
    got = proc(convs, [ims[:2], ims[2:]])
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(got[key], ref[key]), key
    with torch.no_grad():
        mask = ref["attention_mask"].bool()
        torch.testing.assert_close(ours(**got).logits[mask], hf(**ref).logits[mask], atol=1e-4, rtol=1e-4)
