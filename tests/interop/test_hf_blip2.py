"""Parity with transformers' ``Blip2ForConditionalGeneration`` (OPT decoder) and
``InstructBlipForConditionalGeneration`` (OPT and Llama decoders) on tiny random checkpoints built offline: vlmlab
imports them into its own composition (blip_vit tower -> qformer connector -> decoder; weights mapped, not
wrapped) and must give the same logits and greedy generations; its export must load back in transformers with the
same logits."""

import json

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlamaConfig,
    OPTConfig,
    T5Config,
)

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError

IMAGE_TOKEN = 120
N_QUERY = 4
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.02,  # transformers' default (1e-10) would make the image invisible
)
QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=99,
    max_position_embeddings=64,
)


def text_config(kind):
    if kind == "opt":
        return OPTConfig(
            vocab_size=128,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ).to_dict()
    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    ).to_dict()


def hf_model(tmp_path, family="blip-2", text="opt", seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "blip-2": (Blip2Config, Blip2ForConditionalGeneration),
        "instructblip": (InstructBlipConfig, InstructBlipForConditionalGeneration),
    }[family]
    cfg = config_cls(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=text_config(text),
        num_query_tokens=N_QUERY,
        image_token_index=IMAGE_TOKEN,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=1.0)  # transformers starts them at zero
        model.language_projection.weight.mul_(20)  # let the image move the logits visibly
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def batch(instruction=False, seed=1):
    """Two left-padded prompts, each with its image's N_QUERY placeholders (transformers' BLIP-2 layout)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    rows = [[IMAGE_TOKEN] * N_QUERY + text(5), [IMAGE_TOKEN] * N_QUERY + text(3)]
    T = max(map(len, rows))
    ids = torch.ones(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    b = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if instruction:
        b["qformer_input_ids"] = torch.randint(3, 99, (2, 5), generator=g)
        b["qformer_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return b


CASES = [("blip-2", "opt"), ("instructblip", "opt"), ("instructblip", "llama")]


@pytest.mark.parametrize("family,text", CASES)
def test_import_matches_transformers_logits_and_generation(tmp_path, family, text):
    hf, path = hf_model(tmp_path, family, text)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.connector.name == "qformer" and ours.config.vision.name == "blip_vit"
    b = batch(instruction=family == "instructblip")
    with torch.no_grad():
        ref = hf(**b).logits
        got = ours(**b).logits
        moved = ours(**{**b, "pixel_values": b["pixel_values"].flip(0)}).logits
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert (moved - got)[mask].abs().max() > 1e-3  # the image matters (the comparison is not vacuous)
    if family == "instructblip":
        with torch.no_grad():
            other = ours(**{**b, "qformer_input_ids": b["qformer_input_ids"].flip(1)}).logits
        assert (other - got)[mask].abs().max() > 1e-4  # so does the instruction
    ref_gen = hf.generate(**b, max_new_tokens=6, do_sample=False)
    got_gen = ours.generate(**b, max_new_tokens=6)
    # transformers' decoder-only generate returns the prompt too; vlmlab's only the new tokens.
    assert torch.equal(got_gen, ref_gen[:, -got_gen.shape[1] :])
    assert ref_gen.shape[1] in (got_gen.shape[1], got_gen.shape[1] + b["input_ids"].shape[1])


@pytest.mark.parametrize("family,text", CASES[:2])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, family, text):
    hf, path = hf_model(tmp_path, family, text)
    ours = vlmlab.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "out").eval()
    b = batch(instruction=family == "instructblip")
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, hf(**b).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family


def test_a_stage1_model_exports_without_its_stage1_parts(tmp_path):
    """A vlmlab Q-Former with its text side and stage-1 heads exports to blip-2 (they are dropped, as LAVIS does
    for stage 2) and transformers reproduces its logits."""
    from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
    from vlmlab.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    config = ModelConfig(
        vision=VisionConfig("blip_vit", 32, select_layer=-1, select_feature="cls_patch", params=vision),
        connector=ConnectorConfig(
            "qformer",
            {
                "num_queries": N_QUERY,
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": 64,
                "vocab_size": 99,
                "max_position_embeddings": 64,
            },
        ),
        language=LanguageConfig("opt", {k: v for k, v in text_config("opt").items() if k != "model_type"}),
        processor=ProcessorConfig(image_size=32),
        image_token_id=IMAGE_TOKEN,
    )
    ours = VisionLanguageModel(config).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    b = batch()
    mask = b["attention_mask"].bool()  # pad rows differ: OPT's positions there are -1 in transformers, 0 here
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits[mask], ours(**b).logits[mask], atol=1e-5, rtol=1e-5)


def test_bad_inputs_fail_with_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_model(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    # An encoder-decoder (FlanT5) language model.
    t5 = dict(cfg, text_config=T5Config(vocab_size=128, d_model=32, num_layers=1, num_heads=2).to_dict())
    (path / "config.json").write_text(json.dumps(t5))
    with pytest.raises(ConfigError, match="'t5' is not supported") as e:
        vlmlab.from_pretrained(path)
    assert "\n" not in str(e.value)
    (path / "config.json").write_text(json.dumps(cfg))
    # A mis-shaped tensor.
    weights = load_file(str(path / "model.safetensors"))
    bad = dict(weights, query_tokens=torch.zeros(1, N_QUERY + 1, 32))
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mis-shaped.*connector.query_tokens") as e:
        vlmlab.from_pretrained(path)
    assert "\n" not in str(e.value)
    save_file(weights, str(path / "model.safetensors"))
    # Mis-shaped inputs.
    ours = vlmlab.from_pretrained(path).eval()
    b = batch()
    with pytest.raises(Exception, match="placeholder|image") as e:
        ours(**{**b, "pixel_values": b["pixel_values"][:1]})
    assert "\n" not in str(e.value)


def test_image_tokens_and_pixels_equal_blip2_processor(tmp_path):
    """On random image sizes, transformers' ``Blip2Processor`` puts ``num_query_tokens`` image tokens per image
    and vlmlab's processor (the imported checkpoint's settings) counts the same, and both make the same pixels."""
    import random

    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast

    from vlmlab.processing.processor import image_token_counts
    from vlmlab.processing.transforms import images_to_tensor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a photo of a cat"] * 5, trainers.BpeTrainer(special_tokens=["<pad>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>"
    )  # Blip2Processor adds <image>
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    ref = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=N_QUERY)
    _, path = hf_model(tmp_path)
    images.save_pretrained(path)
    model = vlmlab.from_pretrained(path)
    cfg = model.config.processor
    rng = random.Random(0)
    for _ in range(10):
        im = Image.new("RGB", (rng.randint(5, 300), rng.randint(5, 300)))
        im.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(im.width * im.height)])
        out = ref(images=im, text="a photo", return_tensors="pt")
        n_ref = int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
        assert (
            image_token_counts(cfg, model.num_image_tokens, [(im.height, im.width)]) == [n_ref] == [N_QUERY]
        )
        assert torch.allclose(images_to_tensor([im], cfg), out["pixel_values"], atol=1e-5)
