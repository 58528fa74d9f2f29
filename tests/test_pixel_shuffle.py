"""Pixel shuffle (space-to-channel) and the connectors built on it (SYSTEMS.md §18 (d) 2-3, §10 (d) 3, §23):
an exact permutation with channel order (dy, dx, c); InternVL's ``ps_version`` v1 is v2 with the grid transposed
(both checked against the reference function written out below); VILA-1.5's ``mlp_downsample`` pads odd grids."""

import pytest
import torch

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.connectors.pixel_shuffle import (
    channel_to_space,
    downsample_2x2,
    pixel_shuffle,
    space_to_channel,
    transpose_grid,
)


def internvl_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """OpenGVLab/InternVL ``InternVLChatModel.pixel_shuffle`` as the repository writes it (x: [N, W, H, C])."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def vila_flat_square(x, final_permute=False):
    """NVlabs/VILA ``DownSampleBlock.flat_square`` (VILA-1.5: no final permute; NVILA added one)."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    if final_permute:
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def _reference(fn, x, **kw):
    b, n, c = x.shape
    s = int(n**0.5)
    y = fn(x.reshape(b, s, s, c), **kw)
    return y.reshape(b, -1, y.shape[-1])


def test_invertible_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    for r, side, c in [(2, 32, 5), (2, 4, 1), (3, 6, 7), (4, 8, 3)]:
        x = torch.randn(3, side * side, c, generator=g)
        y = space_to_channel(x, r)
        assert y.shape == (3, (side // r) ** 2, r * r * c)
        assert torch.equal(channel_to_space(y, r), x)
        # A permutation: the same multiset of values.
        assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)


def test_internvl_shapes_1024_to_256():
    x = torch.randn(2, 1024, 6)
    assert space_to_channel(x, 2).shape == (2, 256, 24)
    assert CONNECTORS["pixel_shuffle_mlp"](6, 10, ratio=2)(x).shape == (2, 256, 10)
    assert CONNECTORS["pixel_shuffle_mlp"](6, 10, ratio=2).num_tokens(1024) == 256


def test_channel_order_dy_dx_c_on_a_hand_built_grid():
    # A 4 x 4 grid whose token (y, x) has the two channels (10 y + x, -(10 y + x)).
    ids = torch.tensor([[10 * y + x for x in range(4)] for y in range(4)], dtype=torch.float).reshape(1, 16)
    grid = torch.stack([ids, -ids], dim=-1)  # [1, 16, 2]
    out = space_to_channel(grid, 2)  # [1, 4, 8]
    # Output token (i, j) is row i * 2 + j (row-major); its channels = inputs (2i+dy, 2j+dx), in (dy, dx, c) order.
    assert out[0, 1].tolist() == [2, -2, 3, -3, 12, -12, 13, -13]  # token (0, 1)
    assert out[0, 2].tolist() == [20, -20, 21, -21, 30, -30, 31, -31]  # token (1, 0)
    assert out[0, 3].tolist() == [22, -22, 23, -23, 32, -32, 33, -33]  # token (1, 1)


def test_matches_the_internvl_reference_and_v1_is_v2_transposed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 5, generator=g)
    v2 = pixel_shuffle(x, 2, "v2")
    v1 = pixel_shuffle(x, 2, "v1")
    assert torch.equal(v2, _reference(internvl_pixel_shuffle, x, ps_version="v2"))
    assert torch.equal(v1, _reference(internvl_pixel_shuffle, x, ps_version="v1"))
    assert not torch.equal(v1, v2)
    assert torch.equal(v1, transpose_grid(v2))
    # transformers' InternVLModel.pixel_shuffle is v2.
    from transformers import InternVLModel

    hf = InternVLModel.pixel_shuffle(None, x.reshape(2, 8, 8, 5), 0.5).reshape(2, 16, 20)
    assert torch.equal(v2, hf)


def test_mlp_downsample_shapes_padding_and_vila_reference():
    g = torch.Generator().manual_seed(2)
    for side in (4, 5, 27):
        x = torch.randn(2, side * side, 3, generator=g)
        y = downsample_2x2(x)  # VILA-1.5 (v1)
        half = (side + 1) // 2
        assert y.shape == (2, half * half, 12)
        assert torch.equal(y, _reference(vila_flat_square, x))
        assert torch.equal(downsample_2x2(x, "v2"), _reference(vila_flat_square, x, final_permute=True))
    # 27 x 27 = 729 SigLIP tokens -> padded to 28 x 28 -> 196; the padding is zeros in the last row/column.
    x = torch.ones(1, 729, 2)
    y = downsample_2x2(x, "v2").reshape(14, 14, 2, 2, 2)  # [i, j, dy, dx, c]
    assert y[:13, :13].eq(1).all() and y[13, :, 1].eq(0).all() and y[:, 13, :, 1].eq(0).all()
    proj = CONNECTORS["mlp_downsample"](3, 16)
    assert proj.num_tokens(729) == 196 and proj.num_tokens(64) == 16
    assert proj(torch.randn(2, 729, 3)).shape == (2, 196, 16)
    assert [type(m).__name__ for m in proj.layers] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert proj.layers[0].normalized_shape == (12,)


def test_bad_input_is_a_one_line_error():
    for call, err, match in [
        (lambda: pixel_shuffle(torch.randn(1, 16, 2), 2, "v3"), ConfigError, "ps_version 'v3'"),
        (lambda: CONNECTORS["pixel_shuffle_mlp"](4, 8, ps_version="v0"), ConfigError, "ps_version 'v0'"),
        (lambda: CONNECTORS["mlp_downsample"](4, 8, ps_version="x"), ConfigError, "ps_version 'x'"),
        (lambda: space_to_channel(torch.randn(1, 15, 2), 2), ConfigError, "square grid"),
        (lambda: space_to_channel(torch.randn(1, 9, 2), 2), ConfigError, "divides by 2"),
        (lambda: CONNECTORS["pixel_shuffle_mlp"](4, 8)(torch.randn(1, 16, 5)), SampleError, r"\[B, N, 4\]"),
        (lambda: CONNECTORS["pixel_shuffle_mlp"](4, 8)(torch.randn(16, 4)), SampleError, r"got \[16, 4\]"),
        (lambda: CONNECTORS["mlp_downsample"](4, 8)(torch.randn(1, 15, 4)), SampleError, "square token grid"),
    ]:
        with pytest.raises(err, match=match) as e:
            call()
        assert "\n" not in str(e.value)
