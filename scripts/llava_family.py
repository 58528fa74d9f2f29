"""The LLaVA family on the embedded world (issue 3's experiments), reproducible with one command:

    .venv/bin/python scripts/llava_family.py --out runs/llava-family      # or: make llava-family

1. fine detail: ``llava-next-tiny`` (AnyRes over 32-px tiles) against the LLaVA-1.5 design with the same parts
   (one padded 32-px view), the same data, recipe and number of steps;
2. video: ``llava-next-video-tiny`` on the motion task, against its blind baseline (blank frames);
3. multi-image: ``llava-next-interleave-tiny`` on the same-colour/shape task, against its blind baseline.

Each model trains from scratch: captions of the default world first (``--align-steps``), then its task only; it
is evaluated on the test split. Writes
``results.json`` (accuracies, blind accuracies, steps, seconds) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from vlmlab.api import build
from vlmlab.data.dataset import load_stage_records
from vlmlab.data.world import build_world
from vlmlab.evaluation.evaluate import evaluate
from vlmlab.io import atomic_write_json
from vlmlab.presets import PRESETS
from vlmlab.training.stages import Stage
from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

LR = {"vision": 3e-4, "connector": 2e-3, "newline": 2e-3, "fusion": 2e-3, "language": 2e-3}
PARTS = ("vision", "connector", "newline", "fusion", "language")  # every part a model has trains


def llava_1_5_design(preset):
    """The same parts without AnyRes: one view per image, padded to a square with the mean colour (LLaVA-1.5)."""
    processor = dataclasses.replace(preset.config.processor, anyres=None, pad_to_square=True)
    config = dataclasses.replace(preset.config, processor=processor, preset="llava-1.5-design")
    return dataclasses.replace(preset, name="llava-1.5-design", config=config)


def train_task(
    preset,
    tasks: tuple[str, ...],
    world: Path,
    run_dir: Path,
    steps: int,
    seed: int,
    front_layout: float = 0.0,
    align_steps: int = 300,
    vision_lr: float = LR["vision"],
    task_lr: float = LR["language"],
):
    """``preset`` trained from scratch, every part it has: captions first (``align_steps``), then ``tasks``.
    Returns the model, its processor, the training seconds and the samples seen."""
    seed_everything(seed)
    model, processor = build(preset)
    # Captions first, every part training (the tiny recipe's finding: from scratch, a model trained on the task
    # alone learns its answer prior and ignores the image), then the task.
    align = Stage(
        name="align",
        train=PARTS,
        lr=LR,
        steps=align_steps,
        tasks=("caption",),
        batch_size=32,
        warmup_steps=min(30, align_steps // 10),
    )
    stage = Stage(
        name="-".join(tasks),
        train=PARTS,
        lr={"vision": vision_lr, **dict.fromkeys(PARTS[1:], task_lr)},
        steps=steps,
        tasks=tasks,
        batch_size=32,
        warmup_steps=min(30, steps // 10),
        front_layout=front_layout,
    )
    stages = [align, stage] if align_steps else [stage]
    t0 = time.perf_counter()
    options = TrainOptions(run_dir=run_dir, data_root=world, seed=seed, progress=False)
    Trainer(model, processor, stages, options).fit()
    samples = sum(s.steps * s.batch_size for s in stages)
    return model, processor, time.perf_counter() - t0, samples


def train_and_eval(preset, task: str, world: Path, run_dir: Path, steps: int, seed: int, **options):
    """``train_task`` on one task (``options``: its keyword settings), then the test split's accuracy on it."""
    model, processor, seconds, samples = train_task(preset, (task,), world, run_dir, steps, seed, **options)
    records = [r for r in load_stage_records(["test.json"], world, None) if r.task == task]
    result, _ = evaluate(model, processor, records)
    t = result["tasks"][task]
    return {
        "preset": preset.name,
        "task": task,
        "steps": steps,
        "align_steps": options.get("align_steps", 300),
        "vision_lr": options.get("vision_lr", LR["vision"]),
        "task_lr": options.get("task_lr", LR["language"]),
        "accuracy": t["accuracy"],
        "blind_accuracy": t["blind_accuracy"],
        "n_test": t["n"],
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(samples / seconds, 1),
        "visual_tokens_per_image": mean_visual_tokens(processor, records, world),
    }


def mean_visual_tokens(processor, records, world: Path) -> float:
    """Placeholder tokens per image, averaged over the records' images (sizes vary with tilers)."""
    from PIL import Image

    sizes = []
    for r in records:
        for im in r.images:
            with Image.open(im if Path(im).is_absolute() else world / im) as img:
                sizes.append(img.size)
    counts = [processor.image_token_counts([Image.new("RGB", s)])[0] for s in sizes]
    return round(sum(counts) / max(len(counts), 1), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/llava-family"))
    ap.add_argument(
        "--steps", type=int, default=600, help="training steps of every model (equal across designs)"
    )
    ap.add_argument("--n-train", type=int, default=3000, help="training records per task")
    ap.add_argument("--n-test", type=int, default=200, help="test records per task")
    ap.add_argument("--align-steps", type=int, default=300, help="caption steps before each task (0: none)")
    ap.add_argument("--n-captions", type=int, default=4000, help="caption records for the align stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--task-lr", type=float, default=LR["language"], help="connector/newline/LM lr in the task stage"
    )
    ap.add_argument(
        "--vision-lr", type=float, default=LR["vision"], help="the tower's learning rate in the task stage"
    )
    ap.add_argument(
        "--tasks", default="detail,video,multi", help="which experiments to run (comma-separated)"
    )
    args = ap.parse_args(argv)
    tasks = [t for t in ("detail", "video", "multi") if t in args.tasks.split(",")]
    world = args.out / "world"
    build_world(  # only the tasks asked for (each task's records are the same whatever the others are)
        world,
        seed=args.seed,
        n_per_task={"train": args.n_train, "val": 0, "test": args.n_test},
        n_captions={"train": args.n_captions, "val": 0, "test": 0},
        tasks=(),
        extra_tasks=tuple(tasks),
    )
    runs = [
        (PRESETS["llava-next-tiny"](), "detail", 0.0),
        (llava_1_5_design(PRESETS["llava-next-tiny"]()), "detail", 0.0),
        (PRESETS["llava-next-video-tiny"](), "video", 0.0),
        (PRESETS["llava-next-interleave-tiny"](), "multi", 0.5),
    ]
    results = []
    for preset, task, front in [r for r in runs if r[1] in tasks]:
        print(f"training {preset.name} on {task} for {args.steps} steps", flush=True)
        r = train_and_eval(
            preset,
            task,
            world,
            args.out / preset.name,
            args.steps,
            args.seed,
            front_layout=front,
            align_steps=args.align_steps,
            vision_lr=args.vision_lr,
            task_lr=args.task_lr,
        )
        print(
            f"  accuracy {r['accuracy']:.3f}  blind {r['blind_accuracy']:.3f}  ({r['train_seconds']} s)",
            flush=True,
        )
        results.append(r)
    atomic_write_json(
        args.out / "results.json", {"settings": {**vars(args), "out": str(args.out)}, "results": results}
    )
    print("\n| preset | task | steps | accuracy | blind | train s |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['preset']} | {r['task']} | {r['steps']} | {r['accuracy']:.3f} | {r['blind_accuracy']:.3f} | "
            f"{r['train_seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
