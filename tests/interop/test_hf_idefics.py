"""Parity with transformers' ``Idefics2ForConditionalGeneration`` and ``Idefics3ForConditionalGeneration`` on tiny
random checkpoints built offline: vlmlab imports them into its own composition (Idefics tower -> perceiver or
pixel-shuffle connector -> decoder) and takes transformers' batch as it is (``pixel_values`` ``[B, N_img, 3, H, W]``
padded with all-zero images, ``pixel_attention_mask``); logits, greedy generations and the exported checkpoint
must match transformers'."""

import json

import pytest
import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
)

import vlmlab
from vlmlab.errors import CheckpointError, ConfigError, SampleError

IMAGE_TOKEN = 120
N_LATENTS = 8  # idefics2: tokens per image
N_SHUFFLED = 4  # idefics3: (32 / 8) ** 2 patches / 2 ** 2
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def text_config(model_type):
    return dict(
        model_type=model_type,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )


def hf_idefics2(tmp_path, text="mistral"):
    torch.manual_seed(0)
    cfg = Idefics2Config(
        vision_config=VISION,
        text_config=text_config(text),
        perceiver_config=dict(
            hidden_size=32,
            resampler_n_latents=N_LATENTS,
            resampler_depth=2,
            resampler_n_heads=4,
            resampler_head_dim=8,
            num_key_value_heads=2,
        ),
        image_token_id=IMAGE_TOKEN,
    )
    model = Idefics2ForConditionalGeneration(cfg).eval()
    with (
        torch.no_grad()
    ):  # transformers initialises the latents to ones (all latents equal): make them distinct
        model.model.connector.perceiver_resampler.latents.normal_()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def hf_idefics3(tmp_path):
    torch.manual_seed(0)
    cfg = Idefics3Config(
        vision_config=VISION, text_config=text_config("llama"), image_token_id=IMAGE_TOKEN, scale_factor=2
    )
    model = Idefics3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def batch(n_tok, images_per_row, sizes, side, seed=1):
    """Left-padded prompts; row i holds ``images_per_row[i]`` images of ``sizes`` (h, w) (in order), each pasted
    top-left on a zero canvas of ``side`` with its ``pixel_attention_mask``; missing images are all-zero padding."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for n in images_per_row:
        r = text(3)
        for _ in range(n):
            r += [IMAGE_TOKEN] * n_tok + text(2)
        rows.append(r)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    P = max(images_per_row)
    pv = torch.zeros(len(rows), P, 3, side, side)
    pm = torch.zeros(len(rows), P, side, side, dtype=torch.long)
    it = iter(sizes)
    for i, n in enumerate(images_per_row):
        for j in range(n):
            h, w = next(it)
            pv[i, j, :, :h, :w] = torch.randn(3, h, w, generator=g)
            pm[i, j, :h, :w] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "pixel_attention_mask": pm}


def batch2():
    # Images of different sizes on a 40-pixel canvas: padded patches must be masked (tower and perceiver).
    return batch(N_LATENTS, [2, 1], [(40, 40), (24, 37), (30, 21)], side=40)


def batch3():
    return batch(N_SHUFFLED, [3, 1], [(32, 32), (32, 32), (20, 32), (32, 13)], side=32)


def assert_parity(hf, ours, b):
    with torch.no_grad():
        ref, got = hf(**b).logits, ours(**b).logits
    mask = b["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
    ref_gen = hf.generate(**b, max_new_tokens=5, do_sample=False)[:, b["input_ids"].shape[1] :]
    assert torch.equal(ours.generate(**b, max_new_tokens=5), ref_gen)


@pytest.mark.parametrize("text", ["mistral", "llama"])
def test_idefics2_import_matches_transformers_logits_and_generation(tmp_path, text):
    hf, path = hf_idefics2(tmp_path, text)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.connector.name == "idefics2_perceiver" and ours.num_image_tokens == N_LATENTS
    assert_parity(hf, ours, batch2())


def test_idefics2_pixel_attention_mask_matters(tmp_path):
    """Without the mask the padded patches are attended (tower and perceiver): the logits differ."""
    hf, path = hf_idefics2(tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    b = batch2()
    unmasked = {k: v for k, v in b.items() if k != "pixel_attention_mask"}
    with torch.no_grad():
        assert not torch.allclose(ours(**b).logits, ours(**unmasked).logits, atol=1e-3)
        torch.testing.assert_close(ours(**unmasked).logits, hf(**unmasked).logits, atol=1e-4, rtol=1e-4)


def test_idefics3_import_matches_transformers_logits_and_generation(tmp_path):
    hf, path = hf_idefics3(tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    assert ours.config.connector.name == "idefics3" and ours.num_image_tokens == N_SHUFFLED
    assert_parity(hf, ours, batch3())


@pytest.mark.parametrize("family", ["idefics2", "idefics3"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, family):
    hf, path = hf_idefics2(tmp_path) if family == "idefics2" else hf_idefics3(tmp_path)
    cls = Idefics2ForConditionalGeneration if family == "idefics2" else Idefics3ForConditionalGeneration
    b = batch2() if family == "idefics2" else batch3()
    ours = vlmlab.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    back = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**b).logits, hf(**b).logits, atol=1e-5, rtol=1e-5)
    # And the vlmlab-format round trip keeps the same model.
    ours.save_pretrained(tmp_path / "vl")
    again = vlmlab.from_pretrained(tmp_path / "vl").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, ours(**b).logits)


def test_bad_inputs_and_checkpoints_fail_with_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_idefics2(tmp_path)
    ours = vlmlab.from_pretrained(path).eval()
    b = batch2()
    bad = dict(b, pixel_attention_mask=b["pixel_attention_mask"][..., :-8])
    with pytest.raises(SampleError, match="pixel_attention_mask .* does not match pixel_values") as e:
        ours(**bad)
    assert "\n" not in str(e.value)
    fewer = dict(b, input_ids=b["input_ids"][:, 4:], attention_mask=b["attention_mask"][:, 4:])
    with pytest.raises(SampleError) as e:  # a placeholder run cut short: rows and placeholders disagree
        ours(**fewer)
    assert "\n" not in str(e.value)
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("model.connector.perceiver_resampler.latents")
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*connector.perceiver.latents"):
        vlmlab.from_pretrained(path)
    # A model whose parts transformers' Idefics classes cannot express.
    cfg = ours.config
    cfg.connector.params["intermediate_size"] = 48
    from vlmlab.models.vlm import VisionLanguageModel

    with pytest.raises(ConfigError, match="intermediate_size") as e:
        VisionLanguageModel(cfg, load_pretrained=False).save_pretrained(tmp_path / "x", format="hf")
    assert "\n" not in str(e.value)


# -- image splitting and token layouts: vlmlab's processor vs transformers' Idefics processors ------------------
SPECIAL = ["<pad>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (offline) whose merges include ``\\n\\n`` (Idefics3's row/global separator)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world\n\nthe cat\n\n\nsat\n on the mat\n\n"] * 20, trainer)
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>", additional_special_tokens=SPECIAL[1:]
    )
    assert len(t("\n\n", add_special_tokens=False)["input_ids"]) == 1
    return t


def _sizes(n, seed):
    import random

    rng = random.Random(seed)
    return [(rng.randint(5, 300), rng.randint(5, 300)) for _ in range(n)] + [(32, 32), (32, 33), (1, 300)]


@pytest.mark.parametrize("split", [True, False])
def test_idefics3_splitting_and_token_ids_equal_transformers_processor(tokenizer, split):
    from PIL import Image
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from vlmlab.config import ProcessorConfig
    from vlmlab.processing.processor import Processor

    side, n_tok = 32, 4
    ip = Idefics3ImageProcessor(
        size={"longest_edge": 4 * side}, max_image_size={"longest_edge": side}, do_image_splitting=split
    )
    ref_proc = Idefics3Processor(ip, tokenizer, image_seq_len=n_tok)
    ours = Processor(
        tokenizer, ProcessorConfig(image_size=side, tiler="idefics3", tiler_params={"split": split}), n_tok
    )
    for h, w in _sizes(25, seed=int(split)):
        im = Image.new("RGB", (w, h), (h % 256, w % 256, 7))
        ref = ref_proc(text=["<image>"], images=[[im]], add_special_tokens=False)
        got = ours.image_token_layouts([im])[0]
        assert got == ref["input_ids"][0], (h, w)
        views = ours.tiler.num_views((h, w), side)
        assert views == ref["pixel_values"].shape[1] == len(ours.tiler.views(im, side))
        assert got.count(ours.image_token_id) == views * n_tok


@pytest.mark.parametrize("split", [True, False])
def test_idefics2_token_ids_equal_transformers_processor(tokenizer, split):
    from PIL import Image
    from transformers import Idefics2ImageProcessor, Idefics2Processor

    from vlmlab.config import ProcessorConfig
    from vlmlab.processing.processor import Processor

    ref_proc = Idefics2Processor(Idefics2ImageProcessor(do_image_splitting=split), tokenizer, image_seq_len=8)
    ours = Processor(
        tokenizer, ProcessorConfig(image_size=32, tiler="idefics2", tiler_params={"split": split}), 8
    )
    for h, w in _sizes(4, seed=2)[:-1]:  # a 1-pixel-high image has empty quadrants in transformers
        im = Image.new("RGB", (w, h))
        ref = ref_proc(text=["<image>"], images=[im], add_special_tokens=False)
        assert ours.image_token_layouts([im])[0] == ref["input_ids"][0]
        assert ours.tiler.num_views((h, w), 32) == ref["pixel_values"].shape[1] == (5 if split else 1)


def test_imported_processor_settings(tmp_path):
    _, path = hf_idefics3(tmp_path)
    pre = {"size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 32}, "do_image_splitting": True}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    cfg = vlmlab.from_pretrained(path).config.processor
    assert (cfg.tiler, cfg.image_size, cfg.tiler_params) == (
        "idefics3",
        32,
        {"split": True, "longest_edge": 128},
    )


def test_tokenizer_without_idefics_tokens_fails_with_one_line():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from vlmlab.models.tiling.idefics import Idefics3Tiler

    t = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    with pytest.raises(ConfigError, match="no '<fake_token_around_image>' token") as e:
        Idefics3Tiler().token_ids((100, 100), 32, 4, 1, t)
    assert "\n" not in str(e.value)
