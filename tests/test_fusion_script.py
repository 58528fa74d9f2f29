"""``scripts/fusion.py`` (issue 6's figures) runs end to end at a tiny size: each deep-fusion preset trains its
``llm`` stage, then its fusion stages with the LLM frozen, and the decoder's text loss is the same before and
after the fusion stages (text rows never reach the fusion weights)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import fusion  # noqa: E402


def test_fusion_comparison_runs_and_keeps_the_text_ability(tmp_path):
    out = tmp_path / "f"
    args = ["--out", str(out), "--steps", "6", "--n-train", "4", "--n-test", "2", "--n-captions", "8"]
    assert fusion.main([*args, "--presets", "cogagent-tiny,flamingo-tiny", "--max-new-tokens", "4"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["preset"] for r in results] == ["cogagent-tiny", "flamingo-tiny"]
    for r in results:
        assert [s["name"] for s in r["stages"]] == ["llm", "pretrain"]
        assert r["text_loss_at_end"] == r["text_loss_after_llm_stage"]  # exactly: the LLM was frozen
        assert {"colour", "shape"} <= set(r["tasks"])
    assert results[1]["visual_tokens_per_image"] == 1 and results[1]["features_per_image"] == 64
