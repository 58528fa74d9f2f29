"""``scripts/grounding.py`` (issue 5's grounding figure) runs end to end at a tiny size, and its box-quality
measure scores hand-made predictions as IoU says."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import grounding  # noqa: E402


def test_box_quality_on_hand_made_predictions():
    gold = "<ref>the small red circle</ref><box>(100,100),(300,300)</box>"
    rows = [
        {"answer": gold, "prediction": gold},  # IoU 1
        {"answer": gold, "prediction": "<box>(200,200),(400,400)</box>"},  # IoU 1/7
        {"answer": gold, "prediction": "somewhere"},  # no box: 0
    ]
    q = grounding.box_quality(rows)
    assert q["mean_iou"] == pytest.approx((1 + 1 / 7) / 3, abs=1e-4)
    assert q["well_formed"] == pytest.approx(2 / 3, abs=1e-4)


def test_grounding_experiment_runs_and_writes_results(tmp_path):
    out = tmp_path / "g"
    args = ["--out", str(out), "--steps", "2", "--align-steps", "1", "--n-train", "8", "--n-test", "3"]
    assert grounding.main([*args, "--n-captions", "8"]) == 0
    result = json.loads((out / "results.json").read_text())["result"]
    assert result["preset"] == "qwen-vl-tiny" and result["n_test"] == 3
    assert 0 <= result["iou@0.5"] <= 1 and 0 <= result["mean_iou"] <= 1
