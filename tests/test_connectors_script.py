"""``scripts/connectors.py`` (issue 5's comparison) runs end to end at a tiny size: every preset trains through
its own recipe's stages scaled to the same number of steps, and is evaluated against its blind baseline."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import connectors  # noqa: E402

from vlmlab.presets import PRESETS


def test_recipes_scale_to_equal_steps():
    for name in ("tiny", "llava-1.5-tiny", *[n for n in connectors.CANDIDATES if n in PRESETS]):
        preset = PRESETS[name]()
        stages = connectors.scaled_recipe(preset, 100)
        assert abs(sum(s.steps for s in stages) - 100) <= len(stages)
        assert [(s.name, s.train, s.objective) for s in stages] == [
            (s.name, s.train, s.objective) for s in preset.recipe
        ]
        assert all(0 <= s.warmup_steps <= s.steps // 2 for s in stages)


def test_comparison_runs_and_writes_results(tmp_path):
    out = tmp_path / "c"
    args = ["--out", str(out), "--steps", "2", "--n-train", "4", "--n-test", "2", "--n-captions", "8"]
    assert connectors.main([*args, "--presets", "tiny,llava-1.5-tiny", "--max-new-tokens", "4"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["preset"] for r in results] == ["tiny", "llava-1.5-tiny"]
    for r in results:
        assert sum(s["steps"] for s in r["stages"]) in (2, 3)
        assert r["visual_tokens_per_image"] == {"tiny": 16, "llava-1.5-tiny": 64}[r["preset"]]
        assert {"colour", "shape"} <= set(r["tasks"])
        assert all(0 <= t["accuracy"] <= 1 and 0 <= t["blind_accuracy"] <= 1 for t in r["tasks"].values())
