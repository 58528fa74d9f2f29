"""SYSTEMS.md §11-13 invariants: AnyRes resolution choice, token counts and unpad, video pooling counts and
newline options, linear RoPE scaling, the interleaved / in-the-front layout converter, the presets' numbers."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.config import AnyResConfig, VideoConfig
from vlmlab.errors import SampleError
from vlmlab.models import video
from vlmlab.models.tiling import anyres
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.presets.llava_next import NEXT_PINPOINTS
from vlmlab.processing.layout import picks_front, to_front, to_interleaved
from vlmlab.training.stages import apply_stage

NEXT = AnyResConfig(grid_pinpoints=NEXT_PINPOINTS)


@pytest.mark.parametrize(
    "w,h,pinpoint,unpadded,tokens",
    [
        (800, 600, (672, 672), (36, 48), 2340),
        (1000, 500, (336, 672), (24, 48), 1752),
        (500, 1500, (1008, 336), (72, 24), 2376),
        (336, 336, (336, 672), (24, 24), 1176),  # an exact tie: the first pinpoint wins
    ],
)
def test_anyres_resolution_unpad_and_token_counts(w, h, pinpoint, unpadded, tokens):
    assert anyres.select_best_resolution((h, w), NEXT_PINPOINTS) == pinpoint
    gh, gw = anyres.grid_shape((h, w), NEXT_PINPOINTS, 336)
    _, rows, _, cols = anyres.unpad_box(gh * 24, gw * 24, (h, w))
    assert (rows, cols) == unpadded
    assert anyres.num_tokens((h, w), NEXT, 336, 24) == tokens


def test_resolution_tie_break_is_least_waste_then_first():
    # Both keep all 100 x 100 pixels; the smaller canvas wastes less.
    assert anyres.select_best_resolution((100, 100), [[400, 400], [200, 200]]) == (200, 200)
    # Equal effective pixels and equal waste: the first listed wins (strict comparison).
    assert anyres.select_best_resolution((100, 100), [[200, 400], [400, 200]]) == (200, 400)


def test_unpad_keeps_exactly_the_image_features():
    """Features of a tiled image whose padding is marked: unpad removes every padding feature and keeps all
    image features (to within the 1-feature rounding at the image border)."""
    tile, side = 32, 4
    for w, h in [(70, 40), (30, 50), (90, 20), (64, 64)]:
        im = Image.new("RGB", (w, h), (255, 255, 255))
        views = anyres.tile_views(im, [[32, 64], [64, 32], [64, 64]], tile)
        # A feature is "image" when its 8 x 8 pixel cell is mostly white (the padding is black).
        cells = torch.stack(
            [torch.from_numpy(np.asarray(v.convert("L"), dtype=np.float32)) for v in views[1:]]
        )
        feats = cells.view(-1, side, 8, side, 8).mean((2, 4)).reshape(len(views) - 1, side * side, 1)
        feats = torch.cat([torch.zeros(1, side * side, 1), feats])
        cfg = AnyResConfig(grid_pinpoints=[[32, 64], [64, 32], [64, 64]], newline=False)
        packed = anyres.pack_features(feats, (h, w), cfg, tile, None)[side * side :, 0]
        whole = feats[1:].numel()
        assert (packed > 127).sum() == (feats[1:] > 127).sum()  # no image feature lost
        assert (packed < 8).sum() <= whole - packed.numel() + 2 * side  # padding features went


def test_video_pooling_counts_and_newline_positions():
    cfg = VideoConfig(pool="average", stride=2)
    assert video.num_tokens(16, cfg, 24) == 16 * 144
    assert video.num_tokens(16, dataclasses.replace(cfg, newline="grid"), 24) == 16 * 12 * 13
    assert video.num_tokens(16, dataclasses.replace(cfg, newline="frame"), 24) == 16 * 145
    assert video.num_tokens(16, dataclasses.replace(cfg, newline="one_token"), 24) == 16 * 144 + 1
    assert video.num_tokens(3, dataclasses.replace(cfg, pool="bilinear"), 27) == 3 * 14 * 14  # ceil(27 / 2)
    # Pooling a constant map gives that constant, whatever the mode.
    const = torch.full((2, 24 * 24, 5), 3.25)
    for pool in video.POOLS:
        out = video.pool(const, dataclasses.replace(cfg, pool=pool))
        assert out.shape == (2, 144, 5) and torch.allclose(out, torch.full_like(out, 3.25))
    # Newline placement on a 2-frame, 2 x 2 grid: rows end with it (grid), frames end with it (frame).
    feats, nl = torch.zeros(2, 4, 1), torch.ones(1)
    grid = video.add_newlines(feats, dataclasses.replace(cfg, newline="grid"), nl)[:, 0].tolist()
    assert grid == [0, 0, 1, 0, 0, 1] * 2
    frame = video.add_newlines(feats, dataclasses.replace(cfg, newline="frame"), nl)[:, 0].tolist()
    assert frame == [0, 0, 0, 0, 1] * 2


@pytest.mark.parametrize("newline", video.NEWLINES)
@pytest.mark.parametrize("pool_position", video.POOL_POSITIONS)
def test_model_video_rows_equal_processor_token_counts(tokenizer, newline, pool_position):
    from tests.conftest import make_model

    model, proc = make_model(tokenizer)
    cfg = dataclasses.replace(
        model.config.processor,
        video=VideoConfig(newline=newline, pool_position=pool_position, token="<image>"),
    )
    model = VisionLanguageModel(dataclasses.replace(model.config, processor=cfg)).eval()
    assert (model.image_newline is None) == (newline == "no_token")
    frames = torch.randn(2, 3, 3, 32, 32)  # 2 videos of 3 frames; the convnet gives 4 x 4 tokens per frame
    with torch.no_grad():
        rows = model.video_features(frames)
    assert rows.shape[0] == 2 * video.num_tokens(3, cfg.video, 4)


def test_linear_rope_scaling_is_position_division():
    """rotary(p, k) == rotary(p / k, 1): the llava-next-video preset's RoPE at factor 2."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = PRESETS["llava-next-video"]().config.language.params
    assert params["rope_parameters"]["rope_type"] == "linear" and params["rope_parameters"]["factor"] == 2.0
    small = {**params, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    scaled = LlamaRotaryEmbedding(AutoConfig.for_model("llama", **small))
    plain = LlamaRotaryEmbedding(
        AutoConfig.for_model(
            "llama", **{**small, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
        )
    )
    x = torch.zeros(1, 1, 16)
    p = torch.arange(0, 8192, 7)[None]
    cos_s, sin_s = scaled(x, p)
    cos_p, sin_p = plain(x, p.float() / 2)
    torch.testing.assert_close(cos_s, cos_p)
    torch.testing.assert_close(sin_s, sin_p)


def _random_conversation(rng: random.Random) -> list[dict]:
    words = ["compare", "the", "red", "shape", "and", "blue", "one", "\n", "which", "is", "left?"]
    msgs = []
    for turn in range(rng.randint(1, 3)):
        parts = [rng.choice(words) for _ in range(rng.randint(0, 6))]
        for _ in range(rng.randint(0 if turn else 1, 3)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(["<image>", "<image>\n"]))
        msgs.append({"role": "user", "content": " ".join(parts)})
        msgs.append({"role": "assistant", "content": rng.choice(words)})
    return msgs


def test_layout_converter_round_trip_and_moves_only_placeholders():
    rng = random.Random(0)
    for _ in range(200):
        conv = _random_conversation(rng)
        front, anchors = to_front(conv)
        assert to_interleaved(front, anchors) == conv
        n = sum(m["content"].count("<image>") for m in conv)
        assert front[0]["content"].startswith("<image>\n" * n) and len(anchors) == n
        assert sum(m["content"].count("<image>") for m in front) == n
        strip = lambda ms: [m["content"].replace("<image>\n", "").replace("<image>", "") for m in ms]  # noqa: E731
        assert strip(front) == strip(conv)  # the text is unchanged
    single = [
        {"role": "user", "content": "<image>\nWhat color is it?"},
        {"role": "assistant", "content": "red"},
    ]
    assert to_front(single)[0] == single  # one leading image: both layouts are the same
    with pytest.raises(SampleError, match="not an in-the-front layout"):
        to_interleaved(single, to_front(conv)[1] * 5)


def test_front_layout_mix_is_a_stable_fraction():
    ids = [f"r{i}" for i in range(4000)]
    picked = [picks_front(i, 0.3) for i in ids]
    assert 0.27 < sum(picked) / len(ids) < 0.33
    assert picked == [picks_front(i, 0.3) for i in ids]
    assert not any(picks_front(i, 0.0) for i in ids)


def test_videos_as_interleaved_image_lists(tokenizer):
    from tests.conftest import make_model

    model, proc = make_model(tokenizer)
    proc.config = dataclasses.replace(proc.config, video=VideoConfig(as_images=True, token="<|system|>"))
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    frames = [Image.new("RGB", (32, 32), c) for c in ("green", "yellow", "white")]
    conv = [{"role": "user", "content": "<image> then <|system|> then <image>?"}]
    msgs, images = proc.videos_as_images(conv, [red, blue], [frames])
    assert msgs[0]["content"] == "<image> then <image><image><image> then <image>?"
    assert images == [red, *frames, blue]
    enc = proc.encode(conv, [red, blue], [frames])
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 5 * proc.num_image_tokens
    assert enc["pixel_values"].shape[0] == 5
    with pytest.raises(SampleError, match="more videos"):
        proc.videos_as_images(conv, [red, blue], [frames, frames])


@pytest.mark.parametrize("name", ["llava-next", "llava-next-video", "llava-next-interleave"])
def test_real_scale_presets_stage1_trains_exactly_the_projector(name):
    preset = PRESETS[name]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    first = preset.recipe[0]
    groups = apply_stage(model, first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if first.name == "align":
        assert trainable == {n for n, _ in model.connector.named_parameters(prefix="connector")}
    else:  # video / interleave SFT continue from a LLaVA-NeXT checkpoint and train everything
        assert {g["name"] for g in groups} >= {"vision", "connector", "language"}
    tokens = {"llava-next": 576, "llava-next-video": 576, "llava-next-interleave": 729}[name]
    assert model.num_image_tokens == tokens
