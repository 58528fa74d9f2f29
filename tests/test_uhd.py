"""LLaVA-UHD slicing as MiniCPM-V 2.0 does it (SYSTEMS.md §19 (d), numbers computed with its ``slice_image``),
the ``uhd`` tiler's views and token layout, and the ``minicpm-v`` presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmlab
from vlmlab.models.tiling import TILERS
from vlmlab.models.tiling.uhd import Slicing, slice_grid, slice_image
from vlmlab.presets import PRESETS
from vlmlab.training.stages import apply_stage


@pytest.mark.parametrize(
    ("size", "grid", "source", "refine"),
    [
        ((1344, 896), (3, 2), (546, 364), (1344, 896)),  # 6 slices of 448 x 448
        ((1920, 1080), (4, 2), (602, 336), (1680, 952)),
        ((800, 1300), (2, 3), (350, 574), (868, 1386)),  # portrait: 2 columns, 3 rows
    ],
)
def test_slicing_invariants(size, grid, source, refine):
    s = slice_grid(size)  # (width, height) -> grid (cols, rows)
    assert s == Slicing(grid, source, refine)
    assert all(v % 14 == 0 for v in (*s.source, *s.refine))
    cols, rows = grid
    assert s.refine[0] % cols == 0 and s.refine[1] % rows == 0


def test_1344x896_is_seven_views_of_64_tokens():
    s = slice_grid((1344, 896))
    assert s.num_views == 7 and s.num_views * 64 == 448
    assert s.refine[0] // 3 == s.refine[1] // 2 == 448  # each slice is exactly 448^2


def test_small_images_are_one_upscaled_source_view():
    s = slice_grid((300, 200))
    assert s.grid is None and s.refine is None and s.num_views == 1
    assert s.source == (546, 364)  # about 448^2 with the aspect kept, upscaled, multiples of 14
    assert slice_grid((448, 448)) == Slicing(None, (448, 448), None)
    assert slice_grid((1344, 896), never_split=True).grid is None


def test_max_slices_caps_the_grid():
    s = slice_grid((4000, 4000), max_slices=4)
    assert s.grid == (2, 2)  # candidates 3, 4 (5 is over the cap): the square grid
    assert slice_grid((4000, 4000)).grid == (3, 3)


def test_slices_are_the_refine_image_cut_row_major():
    image = Image.effect_noise((1344, 896), 50).convert("RGB")
    s = slice_grid(image.size)
    source, slices = slice_image(image, s)
    assert source.size == (546, 364) and len(slices) == 6
    refine = image.resize(s.refine, Image.Resampling.BICUBIC)
    assert slices[4].tobytes() == refine.crop((448, 448, 896, 896)).tobytes()  # row 1, column 1
    tiler = TILERS["uhd"](scale=448)
    views = tiler.views(image, 448)
    assert len(views) == tiler.num_views((896, 1344), 448) == 7  # num_views takes (height, width)
    assert all(v.size == (448, 448) for v in views)
    assert views[1].tobytes() == slices[0].tobytes()  # already square: left as is


def test_token_layout_is_minicpm_vs_with_markers_and_plain_without():
    tok = PRESETS["minicpm-v-tiny"]().make_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>", "<slice>", "</slice>")}
    newline = tok.encode("\n", add_special_tokens=False)
    tiler = TILERS["uhd"](scale=448)
    image_id, n = 7, 3
    view = [ids["<im_start>"], *[image_id] * n, ids["<im_end>"]]
    got = tiler.token_ids((896, 1344), 448, n, image_id, tok)  # grid (3, 2)
    want = view + [ids["<slice>"], *view * 3, *newline, *view * 3, ids["</slice>"]]
    assert got == want
    assert tiler.token_ids((200, 300), 448, n, image_id, tok) == view  # no slices: the source alone
    plain = PRESETS["qwen-vl-tiny"]().make_tokenizer()  # has none of MiniCPM-V's markers
    no_markers = TILERS["uhd"](scale=448, newline="").token_ids((896, 1344), 448, n, image_id, plain)
    assert no_markers == [image_id] * (7 * n)


def test_minicpm_v_tiny_processor_and_model_agree():
    model, proc = vlmlab.build("minicpm-v-tiny")
    assert model.num_image_tokens == 16
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    image = Image.new("RGB", (96, 80), "red")  # 2 x 1 slices of about 64^2, plus the source
    sample = proc.encode(conv, [image], train=True)
    assert sample["pixel_values"].shape == (3, 3, 64, 64)
    assert (sample["input_ids"] == model.config.image_token_id).sum() == 3 * 16
    assert (sample["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<slice>")).sum() == 1
    batch = proc.collate([sample])
    assert torch.isfinite(model(**batch).loss)
    preset = PRESETS["minicpm-v-tiny"]()
    for stage in preset.recipe:
        assert {g["name"] for g in apply_stage(model, stage)} == {"vision", "connector", "language"}


def test_minicpm_v_preset_has_the_papers_numbers_and_stages():
    from vlmlab.models.vlm import VisionLanguageModel

    preset = PRESETS["minicpm-v"]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.vision.num_tokens == 1024 and model.vision.hidden_size == 1152  # SigLIP-SO400M/14 at 448
    assert model.num_image_tokens == 64 and model.connector.attn.num_heads == 18
    assert model.connector.adaptive and model.language.config.hidden_size == 2304
    assert preset.config.processor.tiler == "uhd"
    frozen_lm = [s.train for s in preset.recipe[:3]]
    assert all("language" not in t for t in frozen_lm) and frozen_lm[0] == ("connector",)
    assert preset.recipe[-1].train == ("vision", "connector", "language")


def test_views_num_views_and_token_layout_agree_for_random_sizes():
    import random

    rng = random.Random(0)
    tok = PRESETS["minicpm-v-tiny"]().make_tokenizer()
    tiler = TILERS["uhd"](max_slices=6, scale=32, patch=8)
    for _ in range(25):
        w, h = rng.randint(8, 200), rng.randint(8, 200)
        views = tiler.views(Image.new("RGB", (w, h)), 32)
        n_views = tiler.num_views((h, w), 32)
        assert len(views) == n_views <= 7 and all(v.size == (32, 32) for v in views)
        assert tiler.token_ids((h, w), 32, 5, 10_000, tok).count(10_000) == 5 * n_views
