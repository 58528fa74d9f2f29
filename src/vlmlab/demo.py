"""The demo: build the embedded world, train ``tiny`` through its stages, evaluate with the blind baseline and
answer one question about a test image. Leaves everything in the run directory (checkpoints, metrics, loss
plot, eval.json / eval.md, the final model in ``model/``)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from vlmlab.api import build, save
from vlmlab.data.dataset import load_stage_records
from vlmlab.data.world import build_world
from vlmlab.evaluation.evaluate import evaluate, markdown_table, split_prompt, write_results
from vlmlab.inference.chat import answer
from vlmlab.presets import PRESETS
from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

log = logging.getLogger("vlmlab.demo")

# World size for the demo: enough distinct scenes that the model cannot memorise them in the time it trains.
DEMO_WORLD = {
    "n_per_task": {"train": 4000, "val": 100, "test": 200},
    "n_captions": {"train": 8000, "val": 0, "test": 0},
}


def run_demo(
    run_dir: Path,
    world_dir: Path,
    seed: int = 0,
    progress: bool = True,
    world: dict | None = None,
    steps: int | None = None,
) -> dict:
    """Run the demo; ``world`` (sizes for ``build_world``) and ``steps`` (every stage) shrink it for tests."""
    t0 = time.perf_counter()
    print(f"[1/4] building the embedded world in {world_dir}")
    build_world(world_dir, seed=seed, **(world or DEMO_WORLD))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    preset = PRESETS["tiny"]()
    recipe = [dataclasses.replace(s, steps=steps) for s in preset.recipe] if steps else preset.recipe
    seed_everything(seed)  # the initial weights are part of the run: same seed, same numbers
    model, processor = build(preset)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[2/4] training tiny ({n_params / 1e6:.2f} M params) through {[s.name for s in recipe]}")
    options = TrainOptions(run_dir=run_dir, data_root=world_dir, seed=seed, progress=progress)
    Trainer(model, processor, recipe, options).fit()
    save(model, processor, run_dir / "model")
    t_train = time.perf_counter() - t0
    print(f"[3/4] evaluating on the test split (with the blind baseline)  [{t_train:.0f} s so far]")
    records = load_stage_records(["test.json"], world_dir, None)
    result, rows = evaluate(model, processor, records)
    result["time_s"] = {"until_trained": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}
    write_results(result, rows, run_dir)
    print(markdown_table(result), end="")
    rec = next(r for r in records if r.task == "shape")
    question = split_prompt(rec)[0][-1]["content"].replace("<image>", "").strip()
    reply = answer(model, processor, question, images=rec.images, max_new_tokens=8)
    print(f"[4/4] {rec.images[0]}\n  Q: {question}\n  A: {reply}   (reference: {split_prompt(rec)[1]})")
    print(f"done in {time.perf_counter() - t0:.0f} s; run in {run_dir} (eval.json, loss.png, model/)")
    return result
