"""``scripts/llava_family.py`` (the README's LLaVA-family experiments) runs end to end at a tiny size and writes
its results: every design trained the same number of steps and evaluated against its blind baseline."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import llava_family  # noqa: E402


def test_llava_family_experiments_run_and_write_results(tmp_path):
    out = tmp_path / "lf"
    assert (
        llava_family.main(
            [
                "--out",
                str(out),
                "--steps",
                "1",
                "--n-train",
                "6",
                "--n-test",
                "3",
                "--align-steps",
                "1",
                "--n-captions",
                "8",
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    rows = {(r["preset"], r["task"]): r for r in result["results"]}
    assert set(rows) == {
        ("llava-next-tiny", "detail"),
        ("llava-1.5-design", "detail"),
        ("llava-next-video-tiny", "video"),
        ("llava-next-interleave-tiny", "multi"),
    }
    for r in rows.values():
        assert r["steps"] == 1 and r["n_test"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["blind_accuracy"] <= 1.0
    # The two detail designs differ only in AnyRes: the LLaVA-1.5 one sees one padded view.
    cfg = json.loads((out / "llava-1.5-design" / "run.json").read_text())
    assert [s["tasks"] for s in cfg["stages"]] == [["caption"], ["detail"]]
