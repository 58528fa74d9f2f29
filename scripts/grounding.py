"""Grounding on the embedded world (issue 5): a preset learns to answer "Where is the small red circle?" with a
Qwen-VL box, scored by IoU@0.5, reproducible with one command:

    .venv/bin/python scripts/grounding.py --out runs/grounding      # or: make grounding

The preset (default ``qwen-vl-tiny``) trains from scratch: captions first (``--align-steps``, every part), then the
``ground`` task alone (``--steps``), and is evaluated on the test split: accuracy = IoU >= 0.5 with the drawn box,
the blind baseline (blank images), the mean IoU, and the share of answers that hold a well-formed box. Writes
``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from connectors import comparison_world

from vlmlab.api import build
from vlmlab.data.dataset import load_stage_records
from vlmlab.evaluation.evaluate import evaluate
from vlmlab.io import atomic_write_json
from vlmlab.presets import PRESETS
from vlmlab.processing.boxes import iou, parse_boxes
from vlmlab.training.stages import Stage
from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

TASK = "ground"


def box_quality(rows: list[dict]) -> dict:
    """Mean IoU of each prediction's first box with the reference box (0 without one) and the share of
    predictions that hold a well-formed box."""
    ious, formed = [], 0
    for r in rows:
        pred, ref = parse_boxes(r["prediction"]), parse_boxes(r["answer"])
        formed += bool(pred)
        if pred and ref:
            p, g = pred[0], ref[0]
            ious.append(iou((p.x1, p.y1, p.x2, p.y2), (g.x1, g.y1, g.x2, g.y2)))
        else:
            ious.append(0.0)
    n = max(1, len(rows))
    return {"mean_iou": round(sum(ious) / n, 4), "well_formed": round(formed / n, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grounding"))
    ap.add_argument("--preset", default="qwen-vl-tiny")
    ap.add_argument("--steps", type=int, default=2000, help="steps on the ground task")
    ap.add_argument("--align-steps", type=int, default=300, help="caption steps first")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-captions", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f"unknown preset {args.preset!r}; valid: {sorted(PRESETS)}")
    world = comparison_world(args, tasks=(), extra_tasks=(TASK,))
    seed_everything(args.seed)
    preset = PRESETS[args.preset]()
    model, processor = build(preset)
    parts = tuple(p for p in ("vision", "connector", "newline", "language") if model.part_parameters(p))
    lr = {p: args.lr / 10 if p == "vision" else args.lr for p in parts}
    base = Stage(
        name="align", train=parts, lr=lr, steps=max(1, args.align_steps), tasks=("caption",), batch_size=32
    )
    stages = [
        dataclasses.replace(base, warmup_steps=min(30, args.align_steps // 10)),
        dataclasses.replace(
            base, name=TASK, steps=args.steps, tasks=(TASK,), warmup_steps=min(50, args.steps // 10)
        ),
    ]
    if not args.align_steps:
        stages = stages[1:]
    t0 = time.perf_counter()
    Trainer(
        model,
        processor,
        stages,
        TrainOptions(run_dir=args.out / args.preset, data_root=world, seed=args.seed, progress=False),
    ).fit()
    seconds = time.perf_counter() - t0
    records = [r for r in load_stage_records(["test.json"], world, None) if r.task == TASK]
    result, rows = evaluate(model, processor, records)
    t = result["tasks"][TASK]
    out = {
        "preset": args.preset,
        "steps": args.steps,
        "align_steps": args.align_steps,
        "iou@0.5": t["accuracy"],
        "blind_iou@0.5": t["blind_accuracy"],
        **box_quality(rows),
        "n_test": t["n"],
        "train_seconds": round(seconds, 1),
        "examples": [{"answer": r["answer"], "prediction": r["prediction"]} for r in rows[:5]],
    }
    atomic_write_json(
        args.out / "results.json", {"settings": {**vars(args), "out": str(args.out)}, "result": out}
    )
    print(
        f"{args.preset}: IoU@0.5 {out['iou@0.5']:.3f} (blind {out['blind_iou@0.5']:.3f}), mean IoU "
        f"{out['mean_iou']:.3f}, well-formed {out['well_formed']:.2f}, {out['train_seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
