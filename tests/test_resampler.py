"""Qwen-VL's position-aware adapter and MiniCPM-V's resampler (SYSTEMS.md §5, §19): remote code upstream, so
tested against the formulas (MAE's 2D sin-cos table, ``get_abs_pos``) and the invariants of §5 (d) / §19 (d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmlab
from vlmlab.errors import SampleError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.connectors.resampler import minicpm_resampler, qwen_vl_adapter, sincos_2d
from vlmlab.presets import PRESETS
from vlmlab.training.stages import apply_stage


def mae_sincos(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The reference (MAE ``get_2d_sincos_pos_embed`` as Qwen-VL / MiniCPM-V ship it), written out here."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("grid", [(4, 4), (16, 16), (3, 5)])
def test_position_table_is_maes_2d_sincos(grid):
    ours = sincos_2d(32, grid)
    assert ours.shape == (grid[0] * grid[1], 32)
    np.testing.assert_allclose(ours.numpy(), mae_sincos(32, *grid), atol=1e-6)


@pytest.mark.parametrize("side", [8, 16, 32])
def test_qwen_vl_adapter_gives_256_rows_for_any_square_grid(side):
    torch.manual_seed(0)
    adapter = CONNECTORS["qwen_vl_adapter"](48, 256)
    assert adapter.attn.num_heads == 256 // 128 and adapter.num_tokens(side * side) == 256
    out = adapter(torch.randn(2, side * side, 48))
    assert out.shape == (2, 256, 256) and torch.isfinite(out).all()
    # Keys: the 16 x 16 query table bicubic-resized to the token grid (Qwen-VL's get_abs_pos).
    table = adapter.pos_embed.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(table, size=(side, side), mode="bicubic", align_corners=False)
    assert torch.allclose(adapter.key_pos((side, side)), resized.permute(0, 2, 3, 1).reshape(side * side, -1))
    if side == 16:
        assert adapter.key_pos((16, 16)) is adapter.pos_embed


def test_qwen_vl_adapter_at_real_scale_has_the_papers_shapes():
    with torch.device("meta"):
        adapter = qwen_vl_adapter(1664, 4096)
    assert adapter.attn.num_heads == 32
    assert adapter.query.shape == adapter.pos_embed.shape == (256, 4096)
    assert adapter.kv_proj.weight.shape == (4096, 1664) and adapter.kv_proj.bias is None
    assert adapter.proj.shape == (4096, 4096)


def test_adapter_is_permutation_invariant_over_kv_only_without_positions():
    torch.manual_seed(0)
    adapter = qwen_vl_adapter(32, 128, num_queries=16).eval()
    x = torch.randn(2, 64, 32)
    perm = torch.randperm(64)
    with torch.no_grad():
        assert not torch.allclose(adapter(x), adapter(x[:, perm]), atol=1e-4)  # keys carry their position
        adapter.pos_embed.zero_()
        assert torch.allclose(adapter(x), adapter(x[:, perm]), atol=1e-5)  # a set without positions


def test_position_table_is_frozen_through_a_training_step():
    torch.manual_seed(0)
    model, proc = vlmlab.build("qwen-vl-tiny")
    connector = model.connector
    assert "pos_embed" not in dict(connector.named_parameters())
    assert not connector.pos_embed.requires_grad and "connector.pos_embed" in model.state_dict()
    groups = apply_stage(model, PRESETS["qwen-vl-tiny"]().recipe[-1])
    assert all(p is not connector.pos_embed for g in groups for p in g["params"])
    before_pos, before_query = connector.pos_embed.clone(), connector.query.detach().clone()
    from PIL import Image

    conv = [
        {"role": "user", "content": "<image>\nWhere is the small red circle?"},
        {"role": "assistant", "content": "<ref>the small red circle</ref><box>(100,200),(300,400)</box>"},
    ]
    batch = proc.collate([proc.encode(conv, [Image.new("RGB", (80, 64), "red")], train=True)])
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model(**batch).loss.backward()
    opt.step()
    assert torch.equal(connector.pos_embed, before_pos)
    assert not torch.equal(connector.query, before_query)


@pytest.mark.parametrize("grid", [(32, 32), (24, 40), (5, 7), (1, 3)])
def test_minicpm_resampler_gives_64_rows_for_any_slice_grid(grid):
    torch.manual_seed(0)
    resampler = CONNECTORS["minicpm_resampler"](40, 256)
    h, w = grid
    out = resampler(torch.randn(3, h * w, 40), tgt_size=grid)
    assert out.shape == (3, 64, 256) and torch.isfinite(out).all()
    keys = resampler.key_pos(grid)
    assert keys.shape == (h * w, 256)
    assert torch.allclose(keys, torch.from_numpy(mae_sincos(256, h, w)).float(), atol=1e-6)  # recomputed
    assert resampler.pos_embed.shape == (64, 256)


def test_minicpm_resampler_at_real_scale_has_18_heads():
    with torch.device("meta"):
        resampler = minicpm_resampler(1152, 2304)
    assert resampler.attn.num_heads == 18 and resampler.query.shape == (64, 2304)


def test_grids_that_do_not_hold_the_tokens_are_refused():
    resampler = minicpm_resampler(16, 128)
    with pytest.raises(SampleError, match="not a square grid; pass tgt_size"):
        resampler(torch.randn(1, 12, 16))
    with pytest.raises(SampleError, match=r"tgt_size \(3, 5\) does not hold 12"):
        resampler(torch.randn(1, 12, 16), tgt_size=(3, 5))


# -- presets ---------------------------------------------------------------------------------------------------
def test_qwen_vl_preset_has_the_papers_numbers_and_stages():
    from vlmlab.models.vlm import VisionLanguageModel

    preset = PRESETS["qwen-vl"]()
    with torch.device("meta"):
        model = VisionLanguageModel(preset.config, load_pretrained=False)
    assert model.vision.num_tokens == 1024 and model.vision.hidden_size == 1664  # ViT-bigG/14 at 448
    assert model.num_image_tokens == 256 and model.connector.attn.num_heads == 32
    assert model.language.config.hidden_size == 4096 and model.language.config.num_hidden_layers == 32
    proc = preset.config.processor
    assert (proc.image_start, proc.image_end, proc.image_label) == ("<img>", "</img>", "Picture {k}: ")
    assert [s.train for s in preset.recipe] == [
        ("vision", "connector"),  # S1: LLM frozen
        ("vision", "connector", "language"),  # S2: everything
        ("connector", "language"),  # S3: ViT frozen
    ]


def test_qwen_vl_tiny_builds_runs_and_trains_what_its_stages_say():
    model, proc = vlmlab.build("qwen-vl-tiny")
    preset = PRESETS["qwen-vl-tiny"]()
    assert model.num_image_tokens == 16 and model.connector.kv_proj.weight.shape == (128, 96)
    assert "ground" in preset.recipe[1].tasks and "ground" in preset.recipe[2].tasks
    parts = {"vision", "connector", "language"}
    for stage, trained in zip(preset.recipe, (parts, parts, {"connector", "language"})):
        groups = apply_stage(model, stage)
        assert {g["name"] for g in groups} == trained
        names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert names == trained
    from PIL import Image

    conv = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    batch = proc.collate([proc.encode(conv, [Image.new("RGB", (96, 64), "red")], train=True)])
    assert torch.isfinite(model(**batch).loss)
