"""The deep-fusion presets on the embedded world (issue 6's figures), reproducible with one command:

    .venv/bin/python scripts/fusion.py --out runs/fusion      # or: make fusion

Each preset trains from scratch through its own recipe: the ``llm`` stage (the decoder alone: the stand-in for
the pretrained LLM these designs freeze), then the paper's stages with the LLM frozen. Reported per preset:
accuracy per task on the test split against its blind baseline (blank images), visual tokens per image, training
samples/s, and the decoder's **text ability** -- the mean next-token loss (and perplexity) of the test split's
answers asked without images -- right after the ``llm`` stage and at the end. The fusion weights never see text
rows, so the two are equal; a LLaVA-style reference (``--reference``) whose LLM trains with the connector shows
what the same measure does when the LLM is not frozen. Writes ``results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from connectors import comparison_arguments, comparison_setup, save_results, scaled_recipe
from PIL import Image

from vlmlab.api import build
from vlmlab.data.dataset import load_stage_records
from vlmlab.evaluation.evaluate import evaluate
from vlmlab.presets import PRESETS
from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

CANDIDATES = ("cogvlm-tiny", "cogagent-tiny", "xcomposer2-tiny", "flamingo-tiny", "mllama-tiny")


def text_loss(model, processor, records, batch_size: int = 32) -> float:
    """Mean next-token loss of the records' answers, the questions asked without their images (text only)."""
    model.eval()
    total, count = 0.0, 0
    samples = []
    for r in records:
        conv = [
            {**m, "content": m["content"].replace(processor.config.image_token, "").strip()}
            for m in r.messages
        ]
        samples.append(processor.encode(conv, [], train=True))
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = processor.collate(samples[i : i + batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, supervised_logits_only=True).loss) * n
            count += n
    return total / count


def train(model, processor, stages, run_dir: Path, world: Path, seed: int) -> float:
    t0 = time.perf_counter()
    Trainer(
        model, processor, stages, TrainOptions(run_dir=run_dir, data_root=world, seed=seed, progress=False)
    ).fit()
    return time.perf_counter() - t0


def run(name: str, world: Path, out: Path, steps: int, seed: int, max_new_tokens: int) -> dict:
    seed_everything(seed)
    preset = PRESETS[name]()
    model, processor = build(preset)
    stages = scaled_recipe(preset, steps)
    test = load_stage_records(["test.json"], world, None)
    first, rest = stages[:1], stages[1:]
    seconds = train(model, processor, first, out / name / "llm", world, seed)
    text_before = text_loss(model, processor, test)
    seconds += train(model, processor, rest, out / name / "fusion", world, seed)
    text_after = text_loss(model, processor, test)
    result, _ = evaluate(model, processor, test, max_new_tokens=max_new_tokens)
    samples = sum(s.batch_size * s.grad_accum * s.steps for s in stages)
    side = processor.config.image_size
    return {
        "preset": name,
        "stages": [{"name": s.name, "train": list(s.train), "steps": s.steps} for s in stages],
        "visual_tokens_per_image": processor.image_token_counts([Image.new("RGB", (side, side))])[0],
        "features_per_image": model.num_media_tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(samples / seconds, 1),
        "text_loss_after_llm_stage": text_before,
        "text_loss_at_end": text_after,
        "tasks": result["tasks"],
    }


def table(results: list[dict]) -> str:
    tasks = sorted({t for r in results for t in r["tasks"]})
    head = (
        "| preset | tokens (features) | samples/s | "
        + " | ".join(tasks)
        + " | text ppl: after llm stage -> end |"
    )
    rows = [head, "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for r in results:
        cells = [
            f"{r['tasks'][t]['accuracy']:.3f} ({r['tasks'][t]['blind_accuracy']:.3f})"
            if t in r["tasks"]
            else ""
            for t in tasks
        ]
        before, after = (math.exp(r[k]) for k in ("text_loss_after_llm_stage", "text_loss_at_end"))
        rows.append(
            f"| {r['preset']} | {r['visual_tokens_per_image']} ({r['features_per_image']}) | {r['samples_per_s']} | "
            + " | ".join(cells)
            + f" | {before:.4f} -> {after:.4f} |"
        )
    return "\n".join(rows) + "\n\naccuracy (blind accuracy: the same questions on blank images)"


def main(argv=None) -> int:
    ap = comparison_arguments(__doc__, "runs/fusion", CANDIDATES, max_new_tokens=16)
    args, names, world = comparison_setup(ap, argv)
    results = []
    for name in names:
        print(f"training {name} for {args.steps} steps", flush=True)
        r = run(name, world, args.out, args.steps, args.seed, args.max_new_tokens)
        accs = ", ".join(f"{t} {v['accuracy']:.2f}/{v['blind_accuracy']:.2f}" for t, v in r["tasks"].items())
        print(
            f"  {r['train_seconds']} s, {r['samples_per_s']} samples/s: {accs}; text loss "
            f"{r['text_loss_after_llm_stage']:.6f} -> {r['text_loss_at_end']:.6f}",
            flush=True,
        )
        results.append(r)
        save_results(args, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
