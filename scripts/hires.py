"""Seeing more detail with fewer tokens on the embedded world (issue 7's comparisons), with one command:

    .venv/bin/python scripts/hires.py --out runs/hires      # or: make hires

1. fine detail: ``fuyu-tiny`` (raw patches, no encoder), ``mini-gemini-tiny`` (low-resolution queries mining a
   high-resolution tower), ``xcomposer2-4khd-tiny`` (HD tiles, 2x2 merge, learned separators) and
   ``llava-next-tiny`` (AnyRes) on the ``detail`` task (stripes legible only at high resolution), each trained from
   scratch with the same data, stages and number of steps (captions, then the task; every part training);
   reported: accuracy (blind accuracy), visual tokens per image, training samples/s;
2. CV-Bench: ``cambrian-tiny`` (two towers, the Spatial Vision Aggregator, re-aggregation in the LLM) against the
   single-encoder ``llava-1.5-tiny`` on the world's CV-Bench-style tasks (2D count and relation, 3D depth and
   distance), scored with CV-Bench's official formula on the world's CV-Bench file (and its blind baseline).

Writes ``results.json`` and prints both tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from connectors import comparison_world, save_results
from llava_family import train_and_eval, train_task

from vlmlab.data.world.cvbench import CVBENCH_FILE, CVBENCH_SPLIT, CVBENCH_TASKS
from vlmlab.evaluation.cvbench import evaluate_cvbench, read_cvbench
from vlmlab.presets import PRESETS

DETAIL = ("fuyu-tiny", "mini-gemini-tiny", "xcomposer2-4khd-tiny", "llava-next-tiny")
CVBENCH = ("cambrian-tiny", "llava-1.5-tiny")


def cvbench_run(
    name: str, world: Path, out: Path, steps: int, align_steps: int, seed: int, tasks=CVBENCH_TASKS
) -> dict:
    """``name`` trained on ``tasks`` (the world's CV-Bench-style tasks, all four by default), then scored on the
    world's CV-Bench file with CV-Bench's formula (per task too: a subset's other tasks stay at chance)."""
    run_dir = out / (name if tuple(tasks) == tuple(CVBENCH_TASKS) else f"{name}-{'-'.join(tasks)}")
    model, processor, seconds, samples = train_task(
        PRESETS[name](), tuple(tasks), world, run_dir, steps, seed, align_steps=align_steps
    )
    items = read_cvbench(world / CVBENCH_FILE.format(split=CVBENCH_SPLIT))
    result, _ = evaluate_cvbench(model, processor, items)
    return {
        "preset": name,
        "task": "cvbench",
        "trained_on": list(tasks),
        "steps": steps,
        "align_steps": align_steps,
        "score": result["score"],
        "blind": result["blind"],
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(samples / seconds, 1),
    }


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/hires"))
    ap.add_argument("--steps", type=int, default=600, help="task steps of every model (equal across designs)")
    ap.add_argument("--align-steps", type=int, default=300, help="caption steps before each task")
    ap.add_argument("--n-train", type=int, default=3000, help="training records per task")
    ap.add_argument("--n-test", type=int, default=200, help="test records per task")
    ap.add_argument("--n-captions", type=int, default=4000, help="caption records for the align stage")
    ap.add_argument("--experiments", default="detail,cvbench", help="detail, cvbench (comma-separated)")
    ap.add_argument("--detail-presets", default=",".join(DETAIL))
    ap.add_argument("--cvbench-presets", default=",".join(CVBENCH))
    ap.add_argument(
        "--cvbench-tasks",
        default=",".join(CVBENCH_TASKS),
        help=f"the CV-Bench-style tasks to train on (comma-separated; default all: {','.join(CVBENCH_TASKS)})",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    experiments = args.experiments.split(",")
    cv_tasks = [t for t in args.cvbench_tasks.split(",") if t]
    unknown = sorted(set(cv_tasks) - set(CVBENCH_TASKS))
    if unknown or not cv_tasks:
        ap.error(f"--cvbench-tasks: {unknown or 'none'} given; choose among {list(CVBENCH_TASKS)}")
    world = comparison_world(args, tasks=(), extra_tasks=("detail", *CVBENCH_TASKS))
    results = []
    if "detail" in experiments:
        for name in [n for n in args.detail_presets.split(",") if n]:
            print(f"training {name} on detail for {args.steps} steps", flush=True)
            r = train_and_eval(
                PRESETS[name](), "detail", world, args.out / name, args.steps, args.seed,
                align_steps=args.align_steps,
            )  # fmt: skip
            print(f"  accuracy {r['accuracy']:.3f} blind {r['blind_accuracy']:.3f} ({r['train_seconds']} s)")
            results.append(r)
            save_results(args, results)
    if "cvbench" in experiments:
        for name in [n for n in args.cvbench_presets.split(",") if n]:
            print(f"training {name} on the CV-Bench-style tasks for {args.steps} steps", flush=True)
            r = cvbench_run(
                name, world, args.out / "cvbench", args.steps, args.align_steps, args.seed, cv_tasks
            )
            print(f"  overall {_f(r['score']['overall'])} blind {_f(r['blind']['overall'])}", flush=True)
            results.append(r)
            save_results(args, results)
    detail = [r for r in results if r["task"] == "detail"]
    if detail:
        print("\n| preset | detail accuracy (blind) | visual tokens per image | train samples/s |")
        print("|---|---:|---:|---:|")
        for r in detail:
            print(
                f"| {r['preset']} | {r['accuracy']:.3f} ({r['blind_accuracy']:.3f}) | "
                f"{r['visual_tokens_per_image']} | {r['samples_per_s']} |"
            )
    cv = [r for r in results if r["task"] == "cvbench"]
    if cv:
        print(
            "\n| preset | trained on | 2D | 3D | overall (CV-Bench formula) | blind overall | per task |"
            "\n|---|---|---:|---:|---:|---:|---|"
        )
        for r in cv:
            s, b = r["score"], r["blind"]
            per_task = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in s["tasks"].items())
            print(
                f"| {r['preset']} | {','.join(r['trained_on'])} | {_f(s['2D'])} | {_f(s['3D'])} | "
                f"{_f(s['overall'])} | {_f(b['overall'])} | {per_task} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
