"""vlmlab's image transform against transformers' CLIP image processor (the PIL backend; torchvision is not
installed here): identical ``pixel_values`` for random sizes and aspect ratios, so a model imported from
transformers sees in vlmlab exactly the pixels it saw there."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vlmlab.config import CLIP_MEAN, CLIP_STD, ProcessorConfig
from vlmlab.processing.transforms import image_to_tensor
from vlmlab.registry import UnknownNameError


@pytest.mark.parametrize("side", [32, 336])
def test_shortest_edge_crop_equals_clip_image_processor(side):
    hf = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    cfg = ProcessorConfig(image_size=side, resize="shortest_edge_crop")
    rng = np.random.default_rng(side)
    sizes = [(side, side), (1, 1), (side + 1, side), (7, 500), (500, 7)] + [
        tuple(int(v) for v in rng.integers(1, 700, 2)) for _ in range(25)
    ]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = hf(images=img, return_tensors="pt")["pixel_values"][0]
        ours = image_to_tensor(img, cfg)
        assert ours.shape == ref.shape == (3, side, side)
        assert torch.equal(ours, ref), (w, h, (ours - ref).abs().max())


def test_unknown_resize_mode_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="shortest_edge_crop.*squash|squash.*shortest_edge_crop"):
        image_to_tensor(Image.new("RGB", (4, 4)), ProcessorConfig(image_size=4, resize="lanczos"))
