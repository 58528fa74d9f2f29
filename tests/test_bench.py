"""``vlmlab bench`` and the optimizations it measures.

The bench is run in ``--quick`` mode (a tiny model) and its JSON checked for structure and consistency, never for
timings; its correctness gates are checked to gate. The optimizations are checked against their references:
the truncated vision tower against transformers' full ``CLIPVisionModel`` / ``SiglipVisionModel``
``hidden_states``, the preallocated KV cache against transformers' ``DynamicLayer``, and the batched, table-driven
image transform against transformers' ``CLIPImageProcessorPil``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from vlmlab.bench import check_close, check_equal, compare, format_table
from vlmlab.cli import main
from vlmlab.config import ProcessorConfig, VisionConfig
from vlmlab.models.encoders.hf_vit import CLIPTower, SiglipTower

SECTIONS = {
    "preprocess_per_image": "images/s",
    "preprocess_batch": "images/s",
    "forward_latency": "ms",
    "generate_b1": "tokens/s",
    "generate_b1_decode": "tokens/s",
    "time_to_first_token": "ms",
    "generate_b8": "tokens/s",
    "generate_b8_decode": "tokens/s",
    "train_step": "samples/s",
    "train_step_bf16": "samples/s",
    "peak_rss": "MiB",
}


def test_quick_bench_measures_both_sides_of_every_section(tmp_path, capsys):
    out = tmp_path / "bench" / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["config"] == "quick"
    assert all(v > 0 for v in result["ceilings"].values())
    assert set(result["results"]) == set(SECTIONS)
    for name, r in result["results"].items():
        assert r["unit"] == SECTIONS[name], name
        for side in ("vlmlab", "transformers"):
            assert math.isfinite(r[side]) and r[side] > 0, (name, side)
        assert r["ratio"] == pytest.approx(r["vlmlab"] / r["transformers"])
        assert r["speedup"] == pytest.approx(r["ratio"] if r["higher_is_better"] else 1 / r["ratio"])
        # Same weights, same inputs: every check passes, so every ratio counts.
        assert r["check"]["ok"] and r["counted"], (name, r["check"])
    train = result["results"]["train_step"]
    losses = train["check"]["losses"]
    assert len(losses["vlmlab"]) == len(losses["transformers"]) == result["model"]["reps"] + 1
    # transformers computes logits at every position and runs the discarded vision layer: more FLOPs.
    assert train["flops_per_step"]["transformers"] > train["flops_per_step"]["vlmlab"] > 0
    for name in ("train_step", "generate_b8_decode"):
        assert set(result["results"][name]["ceiling_share"]) == {"vlmlab", "transformers"}
    bf16 = result["results"]["train_step_bf16"]["loss_vs_fp32"]
    assert bf16["relative_diff"] <= bf16["tol"]
    assert set(result["targets"]) == {"train_step", "generate_b8_decode", "preprocess_batch"}
    printed = capsys.readouterr().out
    assert "train_step" in printed and str(out) in printed


def test_a_failed_check_means_the_ratio_is_not_counted():
    ref = torch.randn(2, 5, 11)
    bad = check_close(ref + 1e-3, ref, 1e-4, "logits")
    good = check_close(ref + 1e-6, ref, 1e-4, "logits")
    assert not bad["ok"] and bad["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)
    assert good["ok"]
    assert not check_close(ref[:1], ref, 1e-4, "logits")["ok"]  # a shape mismatch never passes
    tokens = torch.tensor([[5, 6, 7]])
    assert check_equal(tokens, tokens.clone(), "tokens")["ok"]
    assert not check_equal(tokens, torch.tensor([[5, 6, 8]]), "tokens")["ok"]

    row = compare(30.0, 10.0, bad, "tokens/s", True, "generate_b8_decode")  # 3x faster, but wrong
    assert row["ratio"] == 3.0 and not row["counted"] and row["met"] is False
    row = compare(30.0, 10.0, good, "tokens/s", True, "generate_b8_decode")
    assert row["counted"] and row["met"] is True
    row = compare(30.0, 10.0, good, "ms", False)  # a latency: lower is better
    assert row["speedup"] == pytest.approx(1 / 3) and row["met"] is None

    table = format_table(
        {
            "config": "quick",
            "threads": 1,
            "versions": {"torch": "x", "transformers": "y"},
            "ceilings": {"matmul_gflops": 1.0, "memory_read_gbs": 1.0, "memory_copy_gbs": 1.0},
            "results": {
                "generate_b8_decode": compare(30.0, 10.0, bad, "tokens/s", True, "generate_b8_decode")
            },
        }
    )
    assert "FAILED" in table and "n/c" in table and "missed" in table


@pytest.mark.parametrize("tower_cls", [CLIPTower, SiglipTower])
@pytest.mark.parametrize("layer", [-2, -1, 0, 2])
def test_truncated_tower_equals_the_full_models_hidden_state(tower_cls, layer):
    """Only layers up to ``select_layer`` run, yet the features are transformers' ``hidden_states[layer]`` bit for
    bit, and every weight (the skipped layers', the post-layernorm's ...) is still in the state dict."""
    params = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8
    )
    torch.manual_seed(0)
    tower = tower_cls(VisionConfig(name="x", image_size=32, select_layer=layer, params=params)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        got = tower(pixels)
    assert torch.equal(got, ref[:, 1:] if tower.has_cls else ref)
    assert list(tower.state_dict()) == ["model." + k for k in tower.model.state_dict()]
    assert tower.num_layers_run == layer % 4


def test_preallocated_kv_cache_returns_what_a_dynamic_layer_returns():
    from transformers.cache_utils import DynamicLayer

    from vlmlab.inference.generate import PreallocatedLayer

    ours, ref = PreallocatedLayer(max_len=9), DynamicLayer()
    for n in (5, 1, 1, 2):  # prefill, then single tokens, then two at once
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        got, want = ours.update(k, v), ref.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert ours.get_seq_length() == ref.get_seq_length()
        assert ours.get_mask_sizes(1) == ref.get_mask_sizes(1)


def test_batched_image_transform_equals_transformers_and_the_per_image_path():
    from vlmlab.processing.transforms import image_to_tensor, images_to_tensor

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(50, 30), (20, 90)] * 3
    ]
    cfg = ProcessorConfig(image_size=24, resize="shortest_edge_crop")
    ref = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    want = ref(images=images, return_tensors="pt")["pixel_values"]
    for threads in (1, 3):
        assert torch.equal(images_to_tensor(images, cfg, threads), want)
    assert torch.equal(torch.stack([image_to_tensor(im, cfg) for im in images]), want)
