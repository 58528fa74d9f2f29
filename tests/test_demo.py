"""The demo end to end on a shrunken world and recipe (the full-size claims are checked by CI after `make demo`
with scripts/check_demo.py): every artefact the README promises is left in the run directory."""

import json

import vlmlab
from vlmlab.demo import run_demo


def test_demo_leaves_its_run(tmp_path, capsys):
    world = {
        "n_per_task": {"train": 8, "val": 2, "test": 4},
        "n_captions": {"train": 16, "val": 0, "test": 0},
    }
    result = run_demo(tmp_path / "demo", tmp_path / "world", world=world, steps=2, progress=False)
    run = tmp_path / "demo"
    for f in (
        "eval.json",
        "eval.md",
        "predictions.jsonl",
        "metrics.jsonl",
        "loss.png",
        "run.json",
        "train.log",
    ):
        assert (run / f).is_file(), f
    saved = json.loads((run / "eval.json").read_text())
    assert saved["tasks"] == result["tasks"]
    assert set(saved["tasks"]) == {"colour", "shape", "count", "relation", "position"}
    for t in saved["tasks"].values():
        assert t["n"] == 4 and 0 <= t["accuracy"] <= 1 and 0 <= t["blind_accuracy"] <= 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    model, processor = vlmlab.load(run / "model")
    assert model.config.preset == "tiny"
    out = capsys.readouterr().out
    assert "Q: What shape is this?" in out and "vision gain" in out


def test_demo_is_reproducible(tmp_path, capsys):
    """Same seed, same run: the initial weights are seeded too, so the losses repeat exactly."""
    world = {"n_per_task": {"train": 4, "val": 1, "test": 1}, "n_captions": {"train": 8, "val": 0, "test": 0}}
    losses = []
    for name in ("a", "b"):
        run_demo(tmp_path / name, tmp_path / "world", world=world, steps=2, progress=False)
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows])
    assert losses[0] == losses[1] and len(losses[0]) == 6
