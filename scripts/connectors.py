"""The connectors side by side on the embedded world (issue 5's comparison), reproducible with one command:

    .venv/bin/python scripts/connectors.py --out runs/connectors      # or: make connectors

Every preset trains from scratch through **its own recipe's stages** (objectives, trainable parts, learning rates)
with the stage lengths scaled so that every preset takes the same number of optimizer steps (``--steps``), on the
same world (the default tasks, captions and the grounding task when the world has it), then is evaluated on the
test split against its blind baseline (blank images). Reported per preset: accuracy per task, visual tokens per
image, training samples/s and seconds. Writes ``results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from PIL import Image

from vlmlab.api import build
from vlmlab.data.dataset import load_stage_records
from vlmlab.data.world import build_world
from vlmlab.evaluation.evaluate import evaluate
from vlmlab.io import atomic_write_json, read_jsonl
from vlmlab.presets import PRESETS
from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

# The references first (LLaVA-1.5's MLP over every patch; the ConvNet demo), then the token-compressing designs.
CANDIDATES = (
    "llava-1.5-tiny",
    "blip2-tiny",
    "instructblip-tiny",
    "xcomposer-tiny",
    "qwen-vl-tiny",
    "minicpm-v-tiny",
    "internvl-1.5-tiny",
    "vila-1.5-tiny",
    "perceiver-tiny",
)
GROUND = "ground"  # the referring-expression task (Qwen-VL boxes, scored by IoU@0.5)


def scaled_recipe(preset, total_steps: int):
    """The preset's stages, each lengthened or shortened in proportion so that they add up to ``total_steps``."""
    recipe_steps = sum(s.steps for s in preset.recipe)
    stages = []
    for s in preset.recipe:
        steps = max(1, round(s.steps * total_steps / recipe_steps))
        warmup = min(round(s.warmup_steps * total_steps / recipe_steps), steps // 2)
        stages.append(dataclasses.replace(s, steps=steps, warmup_steps=warmup))
    return stages


def run(name: str, world: Path, out: Path, steps: int, seed: int, max_new_tokens: int) -> dict:
    seed_everything(seed)
    preset = PRESETS[name]()
    model, processor = build(preset)
    stages = scaled_recipe(preset, steps)
    run_dir = out / name
    t0 = time.perf_counter()
    Trainer(
        model, processor, stages, TrainOptions(run_dir=run_dir, data_root=world, seed=seed, progress=False)
    ).fit()
    seconds = time.perf_counter() - t0
    metrics = list(read_jsonl(run_dir / "metrics.jsonl"))
    samples = sum(s.batch_size * s.grad_accum * s.steps for s in stages)
    records = load_stage_records(["test.json"], world, None)
    result, _ = evaluate(model, processor, records, max_new_tokens=max_new_tokens)
    side = processor.config.image_size
    return {
        "preset": name,
        "stages": [
            {"name": s.name, "objective": s.objective, "train": list(s.train), "steps": s.steps}
            for s in stages
        ],
        "visual_tokens_per_image": processor.image_token_counts([Image.new("RGB", (side, side))])[0],
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(samples / seconds, 1),
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "tasks": result["tasks"],
    }


def table(results: list[dict]) -> str:
    tasks = sorted({t for r in results for t in r["tasks"]})
    head = "| preset | visual tokens | samples/s | " + " | ".join(tasks) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(tasks)
    rows = [head, rule]
    for r in results:
        cells = []
        for t in tasks:
            v = r["tasks"].get(t)
            cells.append("" if v is None else f"{v['accuracy']:.3f} ({v['blind_accuracy']:.3f})")
        rows.append(
            f"| {r['preset']} | {r['visual_tokens_per_image']} | {r['samples_per_s']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows) + "\n\naccuracy (blind accuracy: the same questions on blank images)"


def comparison_arguments(doc: str, out: str, candidates, max_new_tokens: int) -> argparse.ArgumentParser:
    """The command line every comparison script shares: presets, equal steps, the world's size."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps of every preset (equal for all)")
    ap.add_argument("--presets", default=",".join(candidates), help="comma-separated presets to compare")
    ap.add_argument("--n-train", type=int, default=2000, help="training records per task")
    ap.add_argument("--n-test", type=int, default=200, help="test records per task")
    ap.add_argument("--n-captions", type=int, default=4000, help="caption records")
    ap.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help="generation length in evaluation"
    )
    ap.add_argument("--seed", type=int, default=0)
    return ap


def comparison_setup(
    ap: argparse.ArgumentParser, argv, extra_tasks=()
) -> tuple[argparse.Namespace, list, Path]:
    """Parsed arguments, the preset names (unknown ones refused) and the world, built under ``--out``."""
    args = ap.parse_args(argv)
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; valid: {sorted(PRESETS)}")
    return args, names, comparison_world(args, extra_tasks=extra_tasks)


def comparison_world(args: argparse.Namespace, **tasks) -> Path:
    """The world under ``--out`` with ``--n-train`` / ``--n-test`` records per task and ``--n-captions`` captions
    (``tasks``: ``build_world``'s ``tasks`` / ``extra_tasks``)."""
    world = args.out / "world"
    build_world(
        world,
        seed=args.seed,
        n_per_task={"train": args.n_train, "val": 0, "test": args.n_test},
        n_captions={"train": args.n_captions, "val": 0, "test": 0},
        **tasks,
    )
    return world


def save_results(args: argparse.Namespace, results: list[dict]) -> None:
    """``results.json`` under ``--out`` with the settings, rewritten (atomically) after every preset."""
    atomic_write_json(
        args.out / "results.json", {"settings": {**vars(args), "out": str(args.out)}, "results": results}
    )


def main(argv=None) -> int:
    ap = comparison_arguments(__doc__, "runs/connectors", CANDIDATES, max_new_tokens=48)
    args, names, world = comparison_setup(ap, argv, extra_tasks=(GROUND,))
    results = []
    for name in names:
        print(f"training {name} for {args.steps} steps", flush=True)
        r = run(name, world, args.out, args.steps, args.seed, args.max_new_tokens)
        accs = ", ".join(f"{t} {v['accuracy']:.2f}/{v['blind_accuracy']:.2f}" for t, v in r["tasks"].items())
        print(f"  {r['train_seconds']} s, {r['samples_per_s']} samples/s: {accs}", flush=True)
        results.append(r)
        save_results(args, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
