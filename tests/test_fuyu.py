"""Fuyu (SYSTEMS.md §7): the ``fuyu`` tiler (resize only above the limit, pad, patches row-major, ``|NEWLINE|``
after each row), the weightless ``fuyu_patches`` tower (channels-last flattening), the §7 (d) invariants (token
counts for the listed sizes, patch k <-> pixel block, no resize below the limit, newline rows keep their word
embedding), the ``fuyu`` preset at real scale on the meta device and ``fuyu-tiny`` training. Parity with
transformers' ``FuyuForCausalLM`` / ``FuyuProcessor`` is in ``tests/interop/test_hf_fuyu.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import vlmlab
from conftest import LLAMA, TEXTS
from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.encoders.fuyu import FuyuPatches, views_from_patches
from vlmlab.models.tiling import TILERS
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.processing.processor import Processor
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.summary import summarize
from vlmlab.training.stages import apply_stage

NEWLINE, SPEAKER = "|NEWLINE|", "|SPEAKER|"
P = 8  # the small model's patch side


@pytest.fixture(scope="module")
def fuyu_tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=(SPEAKER, NEWLINE))


def real_processor(tok) -> Processor:
    """The ``fuyu`` preset's processor (30-px patches, up to 1080 x 1920) on a small tokenizer."""
    return Processor(tok, PRESETS["fuyu"]().config.processor, num_image_tokens=1)


def small_model(tok, max_side=(48, 64)) -> tuple[VisionLanguageModel, Processor]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(name="fuyu_patches", image_size=P),
        connector=ConnectorConfig(name="linear"),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA, max_position_embeddings=256)),
        processor=ProcessorConfig(
            image_size=P,
            image_mean=(0.5,) * 3,
            image_std=(0.5,) * 3,
            image_token=SPEAKER,
            tiler="fuyu",
            tiler_params={"max_height": max_side[0], "max_width": max_side[1]},
            max_length=256,
        ),
        image_token_id=tok.convert_tokens_to_ids(SPEAKER),
    )
    model = VisionLanguageModel(cfg).eval()
    return model, Processor(tok, cfg.processor, model.num_image_tokens)


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- SYSTEMS.md §7 (d) ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "rows", "cols"),
    [(1920, 1080, 36, 64), (640, 480, 16, 22), (4000, 1000, 16, 64), (300, 300, 10, 10)],
)
def test_invariant_1_token_counts_of_the_listed_sizes(fuyu_tok, width, height, rows, cols):
    """rows * (cols + 1) tokens: 2340, 368, 1040 (4000 x 1000 resized to 1920 x 480), 110; of them rows * cols
    are patch placeholders and ``rows`` are ``|NEWLINE|``."""
    proc = real_processor(fuyu_tok)
    image = Image.new("RGB", (width, height))
    (layout,) = proc.image_token_layouts([image])
    assert len(layout) == rows * (cols + 1) == {1920: 2340, 640: 368, 4000: 1040, 300: 110}[width]
    assert proc.image_token_counts([image]) == [rows * cols] == [layout.count(proc.image_token_id)]
    newline = fuyu_tok.convert_tokens_to_ids(NEWLINE)
    assert [i for i, t in enumerate(layout) if t == newline] == [r * (cols + 1) + cols for r in range(rows)]
    if width == 4000:
        assert proc.tiler.resized_size((height, width)) == (480, 1920)


def test_invariant_2_patch_k_is_pixel_block_r_c_flattened_channels_last(fuyu_tok):
    model, proc = small_model(fuyu_tok)
    image = noise(21, 35)  # 3 x 5 patches, the last row and column partly padding
    pixels = proc.encode_visuals([image])["pixel_values"]
    feats = model.vision(pixels)  # [15, 1, 192]
    canvas = np.full((24, 40, 3), 1, dtype=np.uint8)  # transformers' padding level
    canvas[:21, :35] = np.asarray(image)
    normalised = (torch.from_numpy(canvas).float() / 255 - 0.5) / 0.5
    assert feats.shape == (15, 1, P * P * 3)
    for k in range(15):
        r, c = divmod(k, 5)
        block = normalised[r * P : (r + 1) * P, c * P : (c + 1) * P]  # [py, px, ch]
        torch.testing.assert_close(feats[k, 0], block.reshape(-1), atol=1e-6, rtol=0)
    # views_from_patches is the tower's inverse (transformers' flattened patches -> vlmlab's views).
    assert torch.equal(views_from_patches(feats[:, 0], P), pixels)


def test_invariant_3_images_within_the_limit_are_not_resized():
    tiler = TILERS["fuyu"](max_height=48, max_width=64)
    image = noise(48, 61)
    assert tiler.resized_size((48, 61)) == (48, 61)
    views = tiler.views(image, P)
    rows = [np.concatenate([np.asarray(v) for v in views[r * 8 : (r + 1) * 8]], axis=1) for r in range(6)]
    canvas = np.concatenate(rows, axis=0)
    assert np.array_equal(canvas[:, :61], np.asarray(image)) and (canvas[:, 61:] == 1).all()
    # Larger ones shrink to fit, aspect kept (scale = min(48 / 96, 64 / 100) = 0.5): 48 x 50 -> 6 x 7 patches.
    assert tiler.resized_size((96, 100)) == (48, 50) and tiler.num_views((96, 100), P) == 42
    assert TILERS["fuyu"](max_height=None, max_width=None).resized_size((5000, 9000)) == (5000, 9000)


def test_invariant_4_newline_rows_keep_their_word_embedding(fuyu_tok):
    model, proc = small_model(fuyu_tok)
    conv = [{"role": "user", "content": f"{SPEAKER}\nWhat color is the shape?"}]
    images = [noise(30, 45)]
    batch = proc([conv], [images])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])[0]
        table = model.language.get_input_embeddings()
        ids = batch["input_ids"][0]
        newline = fuyu_tok.convert_tokens_to_ids(NEWLINE)
        assert int((ids == newline).sum()) == 4  # ceil(30 / 8) rows
        torch.testing.assert_close(embeds[ids == newline], table(torch.tensor([newline])).expand(4, -1))
        patches = model.connector(model.vision(batch["pixel_values"]))[:, 0]  # raster order
        assert torch.equal(embeds[ids == proc.image_token_id], patches)


def test_text_only_input_gives_the_bare_decoder_logits(fuyu_tok):
    model, _ = small_model(fuyu_tok)
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model.language(input_ids=ids).logits)


def test_any_aspect_ratio_in_one_batch(fuyu_tok):
    """Images of different shapes (one above the limit) in one batch: every sample's placeholders are filled by
    its own patches, and padding the batch changes no sample's logits."""
    model, proc = small_model(fuyu_tok)
    conv = [{"role": "user", "content": f"{SPEAKER}\nWhat shape is this?"}]
    images = [noise(9, 60, 1), noise(57, 13, 2), noise(200, 90, 3)]
    batch = proc([conv] * 3, [[im] for im in images])
    counts = proc.image_token_counts(images)
    assert counts == [
        2 * 8,
        6 * 2,
        6 * 3,
    ]  # 57 x 13 -> 48 x 10; 200 x 90 -> 48 x 21 and batch["pixel_values"].shape == (sum(counts), 3, P, P)
    with torch.no_grad():
        together = model(**batch).logits
        for i, im in enumerate(images):
            alone = proc([conv], [[im]])
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(together[i, -n:], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


# -- errors ---------------------------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(fuyu_tok):
    model, proc = small_model(fuyu_tok)
    cases = [
        (SampleError, "patches \\[N, 3, 8, 8\\]", lambda: model.vision(torch.zeros(2, 3, 16, 16))),
        (SampleError, "\\[N, 192\\]", lambda: views_from_patches(torch.zeros(4, 100), P)),
        (SampleError, "too thin", lambda: proc.tiler.num_views((1, 5000), P)),
        (ConfigError, "takes none", lambda: FuyuPatches(VisionConfig(name="fuyu_patches", params={"x": 1}))),
        (ConfigError, "both max_height", lambda: TILERS["fuyu"](max_height=64, max_width=None)),
        (ConfigError, "8-bit", lambda: TILERS["fuyu"](pad_value=300)),
        (
            ConfigError,
            "not a multiple",
            lambda: TILERS["fuyu"](max_height=50, max_width=64).num_views((9, 9), P),
        ),
    ]
    plain = train_bpe_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=(SPEAKER,))
    no_newline = Processor(plain, proc.config, 1)
    cases.append(
        (ConfigError, "no '\\|NEWLINE\\|' token", lambda: no_newline.image_token_layouts([noise(8, 8)]))
    )
    for error, match, call in cases:
        with pytest.raises(error, match=match) as e:
            call()
        assert "\n" not in str(e.value)


# -- presets --------------------------------------------------------------------------------------------------------
def test_fuyu_preset_at_real_scale_on_the_meta_device():
    """Fuyu-8B: no tower weights, Linear(30 * 30 * 3 -> 4096) with bias, a Persimmon-8B decoder; ``inspect``
    counts the patch placeholders of each size (the newlines are text tokens)."""
    preset = PRESETS["fuyu"]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.num_image_tokens == 1 and not model.part_parameters("vision")
    assert sum(p.numel() for p in model.part_parameters("connector")) == 2700 * 4096 + 4096
    lc = model.language.config
    assert (lc.model_type, lc.hidden_size, lc.num_hidden_layers, lc.num_attention_heads) == (
        "persimmon",
        4096,
        36,
        64,
    )
    assert (lc.vocab_size, lc.intermediate_size, lc.hidden_act, lc.qk_layernorm) == (
        262144,
        16384,
        "relu2",
        True,
    )
    n_lm = sum(p.numel() for p in model.language.parameters())
    assert 9.3e9 < n_lm < 9.5e9  # Persimmon-8B: 9.4B with its untied 262k-token head
    s = summarize("fuyu", [(1080, 1920), (480, 640), (1000, 4000), (300, 300)])
    assert s["visual_tokens"] == {"1080x1920": 2304, "480x640": 352, "1000x4000": 1024, "300x300": 100}
    assert s["tiling"] == "fuyu" and [st["train"] for st in s["stages"]] == [["connector", "language"]]
    with pytest.raises(ConfigError, match="language.pretrained"):
        preset.make_tokenizer()


def test_fuyu_tiny_trains():
    """``fuyu-tiny`` on world-sized images (48-96 px, any aspect): its stages train the projection and the decoder,
    and a few steps on one batch lower the loss."""
    model, proc = vlmlab.build("fuyu-tiny")
    preset = PRESETS["fuyu-tiny"]()
    assert [s.train for s in preset.recipe] == [("connector", "language")] * 2
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    images = [Image.new("RGB", (96, 48), "red"), Image.new("RGB", (50, 60), "blue")]
    assert proc.image_token_counts(images) == [4 * 8, 8 * 7]  # (w x h) 96 x 48 -> 64 x 32; 50 x 60 kept
    samples = [proc.encode(conv, [im], train=True) for im in images]
    batch = proc.collate(samples)
    groups = apply_stage(model, preset.recipe[0])
    opt = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, supervised_logits_only=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # The newline is a real token of the tiny tokenizer, inside the decoder's vocabulary.
    newline = proc.tokenizer.convert_tokens_to_ids(NEWLINE)
    assert newline < model.language.get_input_embeddings().num_embeddings
    assert int((batch["input_ids"][0] == newline).sum()) == 4


def test_processor_config_round_trips(fuyu_tok, tmp_path):
    _, proc = small_model(fuyu_tok)
    proc.save_pretrained(tmp_path)
    again = Processor.from_pretrained(tmp_path)
    assert dataclasses.asdict(again.config) == dataclasses.asdict(proc.config)
    image = noise(30, 70)
    assert again.image_token_layouts([image]) == proc.image_token_layouts([image])
