"""InternVL 1.5 dynamic tiling (SYSTEMS.md §18 (d) 1 and 4, §23 tie-breaks): the worked examples, and tile counts
and tile pixels equal to transformers' ``GotOcr2ImageProcessor(crop_to_patches=True)`` on random sizes.

SYSTEMS.md writes sizes as W x H and grids as InternVL's (i, j) = (tiles across, tiles down): "800 x 1300 ->
(2, 3) -> 896 x 1344" is a portrait image 800 wide and 1300 tall, resized to 896 wide (2 tiles) by 1344 tall (3).
vlmlab passes sizes as (height, width)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.config import ProcessorConfig
from vlmlab.errors import ConfigError
from vlmlab.models.tiling import TILERS
from vlmlab.models.tiling.internvl import candidate_grids, grid
from vlmlab.processing.transforms import image_to_tensor

S = 448
TOKENS_PER_TILE = 256  # 32 x 32 patches of InternViT-6B-448px, pixel-shuffled by 2


@pytest.mark.parametrize(
    "wh,max_tiles,expected_grid,views",
    [
        ((800, 1300), 12, (2, 3), 7),
        ((800, 1300), 6, (2, 3), 7),
        ((1300, 800), 12, (3, 2), 7),
        ((1920, 1080), 12, (4, 2), 9),
        ((1920, 1080), 6, (2, 1), 3),
        ((1000, 1000), 12, (3, 3), 10),  # the tie-break: (1,1), (2,2), (3,3) tie; 1e6 > 0.5 * 448^2 * 9
        ((1000, 1000), 6, (2, 2), 5),
        ((448, 448), 12, (1, 1), 1),  # one tile, no thumbnail
    ],
)
def test_systems_examples(wh, max_tiles, expected_grid, views):
    w, h = wh
    tiler = TILERS["dynamic"](max_tiles=max_tiles)
    assert grid((h, w), S, 1, max_tiles) == expected_grid
    assert tiler.num_views((h, w), S) == views
    if wh == (800, 1300):
        assert views * TOKENS_PER_TILE == 1792
        i, j = expected_grid
        assert (S * i, S * j) == (896, 1344)


def test_candidates_and_tie_break_order():
    assert candidate_grids(1, 4) == ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1))
    assert all(2 <= i * j <= 6 for i, j in candidate_grids(2, 6))
    # A square image small enough keeps (1, 1): 600^2 <= 0.5 * 448^2 * 4, so (2, 2) does not win the tie.
    assert grid((600, 600), S) == (1, 1)
    assert grid((700, 700), S) == (2, 2)  # 490000 > 401408, but < 0.5 * 448^2 * 9
    assert grid((600, 600), S, min_tiles=2) == (2, 2)  # (1, 1) is not a candidate


def test_views_are_row_major_crops_of_the_squashed_image_plus_thumbnail():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 130, 3), dtype=np.uint8))  # h=50, w=130 -> (3, 1)
    tiler = TILERS["dynamic"](max_tiles=6)
    views = tiler.views(img, 32)
    assert tiler.grid((50, 130), 32) == (3, 1) and len(views) == 4
    canvas = np.asarray(img.resize((96, 32), Image.Resampling.BICUBIC))
    for k in range(3):
        assert np.array_equal(np.asarray(views[k]), canvas[:, 32 * k : 32 * (k + 1)])
    assert np.array_equal(np.asarray(views[3]), np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC)))
    assert len(TILERS["dynamic"](max_tiles=6, thumbnail=False).views(img, 32)) == 3


def test_matches_got_ocr2_image_processor_on_random_sizes():
    """Tile counts and pixels equal GotOcr2ImageProcessor(crop_to_patches=True) (the PIL backend here; no
    torchvision) for ~30 random sizes, and the token counts InternVLProcessor would write."""
    from transformers import GotOcr2ImageProcessor

    side = 28
    rng = np.random.default_rng(1234)
    sizes = [(side, side), (1, 1), (side * 2, side * 2), (9, 200), (200, 9)] + [
        tuple(int(v) for v in rng.integers(5, 160, 2)) for _ in range(25)
    ]
    for max_tiles in (12, 6):
        hf = GotOcr2ImageProcessor(
            size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
        )
        tiler = TILERS["dynamic"](min_tiles=1, max_tiles=max_tiles)
        cfg = ProcessorConfig(image_size=side, image_mean=hf.image_mean, image_std=hf.image_std)
        for w, h in sizes:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ref = hf(images=img, return_tensors="pt")
            n = int(ref["num_patches"][0])
            assert tiler.num_views((h, w), side) == n == hf.get_number_of_image_patches(h, w, {}), (w, h)
            ours = torch.stack([image_to_tensor(v, cfg) for v in tiler.views(img, side)])
            assert torch.equal(ours, ref["pixel_values"]), (w, h, max_tiles)


def test_bad_settings_fail_with_one_line():
    for kw in ({"min_tiles": 0}, {"min_tiles": 5, "max_tiles": 4}):
        with pytest.raises(ConfigError, match="min_tiles <= max_tiles") as e:
            TILERS["dynamic"](**kw)
        assert "\n" not in str(e.value)
