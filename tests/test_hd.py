"""InternLM-XComposer2-4KHD's ``hd`` tiler (SYSTEMS.md §15): HD_transform's resize and padding, tile counts and the
token formula on the worked examples, the 2 x 2 merge order, where ``sub_GN`` / ``glb_GN`` go, the processor's
counts against the model's rows, and the two presets.

SYSTEMS.md writes sizes as W x H ("800 x 1300 -> 672 x 1008" is a portrait image 800 wide, 1300 tall, padded to
672 wide by 1008 tall); vlmlab passes ``(height, width)``."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import vlmlab
from vlmlab.config import ProcessorConfig
from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors.pixel_shuffle import space_to_channel
from vlmlab.models.tiling import TILERS
from vlmlab.models.tiling.hd import HDTiler, hd_grid, hd_layout, hd_num_tokens, hd_scale, hd_transform
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.processing.transforms import image_to_tensor
from vlmlab.training.stages import apply_stage

S = 336
CLIP_336 = 576  # 24 x 24 patch tokens per view


@pytest.mark.parametrize(
    "wh,hd_num,padded_wh,tiles,tokens",
    [
        ((800, 1300), 9, (672, 1008), 6, 1057),
        ((800, 1300), 16, (1008, 1344), 12, 1933),
        ((800, 1300), 25, (1344, 2016), 24, 3685),
        ((1920, 1080), 16, (1680, 1008), 15, 2353),
        ((336, 336), 9, (1008, 1008), 9, 10 * 144 + 1 + 4 * 12),  # small images are upscaled
    ],
)
def test_systems_examples(wh, hd_num, padded_wh, tiles, tokens):
    w, h = wh
    tiler = TILERS["hd"](hd_num=hd_num)
    rows, cols = tiler.grid((h, w), S)
    assert (cols * S, rows * S) == padded_wh
    assert rows * cols == tiles and tiler.num_views((h, w), S) == tiles + 1
    assert tiler.num_tokens((h, w), S, CLIP_336) == tokens == (tiles + 1) * 144 + 1 + (rows + 1) * 12
    # The pixels: the padded image has exactly that size, and the views are the global one plus the tiles.
    padded = hd_transform(Image.new("RGB", (w, h), "gray"), hd_num, S)
    assert padded.size == padded_wh
    if wh == (800, 1300):
        views = tiler.views(Image.new("RGB", (w, h), "gray"), S)
        assert len(views) == tiles + 1 and all(v.size == (S, S) for v in views)


def test_4k_budget_and_orientation():
    """A 3840 x 2160 (W x H) frame at HD-55: 9 x 6 tiles; its portrait transpose has the grid transposed, and the
    token count differs through the row separators (rows + 1 of them per 12-row block)."""
    assert hd_grid((2160, 3840), 55, S) == (6, 9)
    assert hd_grid((3840, 2160), 55, S) == (9, 6)
    assert hd_num_tokens((2160, 3840), 55, S, CLIP_336) == 55 * 144 + 1 + 7 * 12 == 8005
    assert hd_num_tokens((3840, 2160), 55, S, CLIP_336) == 55 * 144 + 1 + 10 * 12 == 8041


def test_scale_is_the_largest_within_budget_and_sides_are_tile_multiples():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 500), (500, 1), (S, S), (S, 2 * S), (3000, 20)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(200)]
    for hd_num in (1, 4, 9, 16, 25, 55):
        for h, w in sizes:
            ratio = max(h, w) / min(h, w)
            s = hd_scale(ratio, hd_num)
            # The reference's count-up loop finds the largest s within the budget (s * ceil(s / ratio) grows).
            assert s == max(k for k in range(1, hd_num + 1) if k * math.ceil(k / ratio) <= hd_num)
            layout = hd_layout((h, w), hd_num, S)
            assert layout.transposed == (w < h)
            assert layout.resized[1] == s * S and layout.padded[1] == s * S
            assert layout.padded[0] % S == 0 and 0 <= layout.padded[0] - layout.resized[0] < S
            rows, cols = hd_grid((h, w), hd_num, S)
            assert 1 <= rows * cols <= hd_num
            if h != w:  # a portrait is its transpose's landscape: the grid is transposed
                assert hd_grid((w, h), hd_num, S) == (cols, rows)


def test_padding_is_white_centred_with_the_odd_row_below_and_portraits_pad_their_width():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (51, 130, 3), dtype=np.uint8))  # W 130, H 51: ratio 2.55
    tile, hd_num = 32, 6
    # scale 3 (3 * ceil(3 / 2.55) = 6 <= 6): 96 wide, int(96 / 2.549) = 37 tall, padded to 64: 13 above, 14 below.
    layout = hd_layout((51, 130), hd_num, tile)
    assert layout == (False, (37, 96), (64, 96), 13)
    padded = np.asarray(hd_transform(img, hd_num, tile))
    resized = np.asarray(img.resize((96, 37), Image.Resampling.BILINEAR))
    assert padded.shape == (64, 96, 3)
    assert (padded[:13] == 255).all() and (padded[50:] == 255).all()
    assert np.array_equal(padded[13:50], resized)
    # The portrait (the same pixels transposed): transposed, resized, padded, transposed back, as the reference.
    portrait = img.transpose(Image.Transpose.TRANSPOSE)  # W 51, H 130
    padded_p = np.asarray(hd_transform(portrait, hd_num, tile))
    assert padded_p.shape == (96, 64, 3)
    assert (padded_p[:, :13] == 255).all() and (padded_p[:, 50:] == 255).all()
    assert np.array_equal(padded_p[:, 13:50], resized.transpose(1, 0, 2))
    # Views: the tiles are the padded image cut row-major.
    tiler = HDTiler(hd_num=hd_num)
    views = tiler.views(portrait, tile)
    rows, cols = tiler.grid((130, 51), tile)
    assert (rows, cols) == (3, 2) and len(views) == 1 + 6
    for k, v in enumerate(views[1:]):
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(v), padded_p[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile])


def test_global_view_is_the_references_bicubic_interpolation_up_to_8_bits():
    """The reference resizes the normalised padded tensor with ``F.interpolate(bicubic)``; the global view, once the
    processor normalises it, differs by at most half an 8-bit level where the reference stays in the pixel range."""
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    cfg = ProcessorConfig(image_size=32)
    tiler = HDTiler(hd_num=9)
    padded = hd_transform(img, 9, 32)
    ours = image_to_tensor(tiler.views(img, 32)[0], cfg)
    mean, std = torch.tensor(cfg.image_mean)[:, None, None], torch.tensor(cfg.image_std)[:, None, None]
    full = (torch.from_numpy(np.asarray(padded, dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std
    ref = torch.nn.functional.interpolate(full[None], size=(32, 32), mode="bicubic", align_corners=False)[0]
    in_range = ((ref * std + mean) >= 0) & ((ref * std + mean) <= 1)
    assert in_range.float().mean() > 0.5
    assert ((ours - ref).abs() * std)[in_range].max() <= 0.5 / 255 + 1e-5


def _coded(views: int, g: int, c: int) -> torch.Tensor:
    """Tower features whose value names them: view v, row y, column x, channel k -> 1 + 1000v + 100y + 10x + k."""
    v, y, x, k = torch.meshgrid(
        torch.arange(views), torch.arange(g), torch.arange(g), torch.arange(c), indexing="ij"
    )
    return (1 + 1000 * v + 100 * y + 10 * x + k).float().reshape(views, g * g, c)


@pytest.mark.parametrize("size,grid", [((48, 96), (2, 3)), ((96, 48), (3, 2))])
def test_merge_order_and_separator_positions(size, grid):
    """2 x 2 merge in (dy, dx, c) channel order; ``sub_GN`` after every row of the global 2 x 2 map and of the
    stitched (rows * 2) x (cols * 2) local map; ``glb_GN`` between them; tiles stitched row-major."""
    tile, g, c = 32, 4, 3
    tiler = HDTiler(hd_num=6)
    assert tiler.grid(size, tile) == grid
    rows, cols = grid
    packer = tiler.packer(c, tile)
    with torch.no_grad():
        packer.sub_gn.fill_(-1.0)
        packer.glb_gn.fill_(-2.0)
    feats = _coded(1 + rows * cols, g, c)
    out = packer(feats, size)
    m = g // 2
    assert out.shape == (tiler.num_tokens(size, tile, g * g), 4 * c)
    assert out.shape[0] == (rows * cols + 1) * m * m + 1 + (rows + 1) * m
    # The merge is space_to_channel's (dy, dx, c) order (SYSTEMS.md §23).
    merged = space_to_channel(feats, 2)
    assert torch.equal(
        merged[0, 1], torch.cat([feats[0, 0 * g + 2], feats[0, 0 * g + 3], feats[0, g + 2], feats[0, g + 3]])
    )

    def token(view, y, x):  # the merged token of (view, y, x) in the merged grid: channels (dy, dx, c)
        return torch.cat([feats[view, (2 * y + dy) * g + 2 * x + dx] for dy in (0, 1) for dx in (0, 1)])

    sub_rows, glb_rows, expected = [], [], []
    for i in range(m):  # global view: m rows of m tokens + sub_GN
        expected += [token(0, i, j) for j in range(m)] + [None]
        sub_rows.append(len(expected) - 1)
    expected.append(None)
    glb_rows.append(len(expected) - 1)
    for r in range(rows * m):  # the stitched local map: (rows m) x (cols m) tokens, sub_GN after each row
        for q in range(cols * m):
            expected.append(token(1 + (r // m) * cols + q // m, r % m, q % m))
        expected.append(None)
        sub_rows.append(len(expected) - 1)
    assert len(expected) == out.shape[0]
    for n, row in enumerate(expected):
        if row is not None:
            assert torch.equal(out[n], row), n
    is_sub, is_glb = (out == -1).all(1), (out == -2).all(1)
    assert is_sub.nonzero().flatten().tolist() == sub_rows
    assert is_glb.nonzero().flatten().tolist() == glb_rows == [m * (m + 1)]
    with pytest.raises(SampleError, match="views"):
        packer(feats[:-1], size)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlmlab.build("xcomposer2-4khd-tiny")


def test_processor_counts_equal_the_models_rows_and_separators_reach_the_llm(tiny):
    model, proc = tiny
    rng = np.random.default_rng(3)
    sizes = [(32, 32), (1, 120), (120, 1), (128, 128)] + [
        tuple(int(v) for v in rng.integers(8, 200, 2)) for _ in range(12)
    ]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    conv = [{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "yes"}]
    samples = [proc.encode(conv, images[i : i + 2], train=True) for i in range(0, len(images), 2)]
    batch = proc.collate(samples)
    counts = proc.image_token_counts(images)
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert batch["pixel_values"].shape[0] == sum(proc.tiler.num_views(s, 32) for s in sizes)
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert placeholders.tolist() == [counts[i] + counts[i + 1] for i in range(0, len(sizes), 2)]
    with torch.no_grad():
        model.packer.sub_gn.normal_()  # zero at init (the reference's): made distinct to be found
        model.packer.glb_gn.normal_()
        rows = model.image_features(batch["pixel_values"], batch["image_sizes"])
        assert rows.shape[0] == sum(counts)
        # The separators go through the projector like every row: each image's rows at the sub_GN / glb_GN
        # positions are the projector's output of those vectors.
        sub, glb = (model.connector(v[None, None])[0, 0] for v in (model.packer.sub_gn, model.packer.glb_gn))
        m = 2  # 4 x 4 ConvNet tokens per 32-px view, merged 2 x 2
        at = 0
        for size, n in zip(sizes, counts):
            image = rows[at : at + n]
            at += n
            r, c = proc.tiler.grid(size, 32)
            subs = [i * (m + 1) + m for i in range(m)]
            subs += [m * (m + 1) + 1 + k * (c * m + 1) + c * m for k in range(r * m)]
            is_sub, is_glb = (torch.isclose(image, v, atol=1e-6).all(1) for v in (sub, glb))
            assert is_sub.nonzero().flatten().tolist() == subs
            assert is_glb.nonzero().flatten().tolist() == [m * (m + 1)]
    with pytest.raises(SampleError, match="image_sizes"):
        model.image_features(batch["pixel_values"], None)
    with pytest.raises(SampleError, match="views"):
        model.image_features(batch["pixel_values"][1:], batch["image_sizes"])


def test_tiny_forward_backward_trains_the_separators(tiny, tmp_path):
    model, proc = tiny
    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    text = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]
    batch = proc.collate(
        [proc.encode(conv, [Image.new("RGB", (96, 48), "red")], train=True), proc.encode(text, train=True)]
    )
    recipe = PRESETS["xcomposer2-4khd-tiny"]().recipe
    assert [s.train for s in recipe] == [("language",), ("vision", "connector", "fusion", "newline")]
    groups = apply_stage(model, recipe[1])
    assert {id(p) for p in model.packer.parameters()} <= {id(p) for g in groups for p in g["params"]}
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for p in (model.packer.sub_gn, model.packer.glb_gn, *model.connector.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # The separators are saved with the model and come back.
    model.save_pretrained(tmp_path)
    again = VisionLanguageModel.from_pretrained(tmp_path)
    assert torch.equal(again.packer.sub_gn, model.packer.sub_gn)
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-5)
    # Text-only batches carry no images and no sizes.
    assert proc.collate([proc.encode(text, train=True)])["image_sizes"] is None


def test_configuration_errors(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="hd_num"):
        HDTiler(hd_num=0)
    cfg = model.config
    shuffled = type(cfg).from_dict(
        {**cfg.to_dict(), "connector": {"name": "pixel_shuffle_mlp", "params": {"ratio": 2}}}
    )
    with pytest.raises(ConfigError, match="one to one"):
        VisionLanguageModel(shuffled, load_pretrained=False)
    with pytest.raises(ConfigError, match="square token grid"):
        hd_num_tokens((32, 32), 6, 32, 3 * 3)


def test_real_scale_preset_on_meta():
    from vlmlab.summary import render, summarize

    preset = PRESETS["xcomposer2-4khd"]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.num_image_tokens == CLIP_336
    assert model.packer.out_dim == 4096 and model.packer.sub_gn.shape == (4096,)
    assert model.connector.layers[0].in_features == 4096 and model.connector.layers[-1].out_features == 4096
    assert preset.config.processor.tiler_params == {"hd_num": 55}
    assert preset.config.fusion.mode == "plora" and preset.config.fusion.rank == 256
    pretrain, sft = ({id(p) for g in apply_stage(model, s) for p in g["params"]} for s in preset.recipe)
    language = {id(p) for p in model.part_parameters("language")}
    packer = {id(p) for p in model.packer.parameters()}
    assert packer <= pretrain and not pretrain & language and language <= sft
    s = summarize("xcomposer2-4khd", [(2160, 3840)])
    assert s["visual_tokens"] == {"2160x3840": 8005}
    assert "2160x3840: 8005" in render(s)
