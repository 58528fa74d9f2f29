"""``scripts/hires.py`` (issue 7's comparisons) runs end to end at a tiny size: a design on the fine-detail task
(accuracy, blind accuracy, visual tokens per image, samples/s) and a design on the world's CV-Bench-style tasks
scored with CV-Bench's formula."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import hires  # noqa: E402


def test_hires_comparisons_run_and_write_results(tmp_path):
    out = tmp_path / "h"
    args = ["--out", str(out), "--steps", "2", "--align-steps", "1", "--n-train", "4", "--n-test", "4"]
    args += ["--n-captions", "4", "--detail-presets", "fuyu-tiny", "--cvbench-presets", "cambrian-tiny"]
    assert hires.main(args) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    detail, cv = results
    assert (detail["preset"], detail["task"]) == ("fuyu-tiny", "detail")
    assert (
        detail["visual_tokens_per_image"] == 8 * 8
    )  # 128 px detail images shrunk to the 64 px limit: 8 x 8 patches
    assert 0 <= detail["accuracy"] <= 1 and 0 <= detail["blind_accuracy"] <= 1
    assert (cv["preset"], cv["task"]) == ("cambrian-tiny", "cvbench")
    score = cv["score"]
    assert score["overall"] == (score["2D"] + score["3D"]) / 2
    assert set(score["sources"]) == {"world2d-a", "world2d-b", "world3d"}


def test_cvbench_on_a_subset_of_tasks_and_a_bad_task_name(tmp_path, capsys):
    import pytest

    out = tmp_path / "h"
    args = ["--out", str(out), "--steps", "2", "--align-steps", "1", "--n-train", "4", "--n-test", "4"]
    args += ["--n-captions", "4", "--experiments", "cvbench", "--cvbench-presets", "llava-1.5-tiny"]
    assert hires.main([*args, "--cvbench-tasks", "cv-count"]) == 0
    (cv,) = json.loads((out / "results.json").read_text())["results"]
    assert cv["trained_on"] == ["cv-count"] and (out / "cvbench" / "llava-1.5-tiny-cv-count").is_dir()
    assert set(cv["score"]["tasks"]) == {"Count", "Relation", "Depth", "Distance"}  # scored on the whole file
    assert "| llava-1.5-tiny | cv-count |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        hires.main([*args, "--cvbench-tasks", "cv-colour"])
    assert "--cvbench-tasks: ['cv-colour']" in capsys.readouterr().err
