"""The ``vlmlab`` command: thin subcommands that parse arguments and call the library.

Bad input (a missing file, a corrupt image, an unknown preset ...) is printed as one line naming the problem,
with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("vlmlab")


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _part_lr(s: str) -> tuple[str, float]:
    from vlmlab.models.vlm import PARTS

    part, sep, value = s.partition("=")
    if not sep or part not in PARTS:
        raise argparse.ArgumentTypeError(f"expected PART=LR with PART one of {list(PARTS)}, got {s!r}")
    try:
        return part, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rate {value!r} is not a number") from None


def cmd_presets(args: argparse.Namespace) -> None:
    from vlmlab.presets import PRESETS

    width = max(map(len, PRESETS))
    for name in sorted(PRESETS):
        p = PRESETS[name]()
        stages = ", ".join(
            f"{s.name}({'+'.join(s.train)}, {s.steps} steps{'' if s.objective == 'lm' else ', ' + s.objective})"
            for s in p.recipe
        )
        print(f"{name:<{width}}  {p.description}\n{'':<{width}}  recipe: {stages}")


def _image_size(s: str) -> tuple[int, int]:
    h, sep, w = s.lower().partition("x")
    try:
        size = (int(h), int(w)) if sep else (int(h), int(h))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH (e.g. 800x1300) or a side, got {s!r}"
        ) from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {s!r}")
    return size


def cmd_inspect(args: argparse.Namespace) -> None:
    import json

    from vlmlab.summary import render, summarize

    s = summarize(args.preset, args.image_size or [])
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "config"}, indent=2))
    else:
        print(render(s))


def cmd_world(args: argparse.Namespace) -> None:
    from vlmlab.data.world import build_world

    summary = build_world(
        args.out,
        seed=args.seed,
        n_per_task={"train": args.train, "val": args.val, "test": args.test},
        n_captions={"train": args.captions, "val": 0, "test": 0},
    )
    print(f"world written to {args.out}: {summary.get('counts', summary)}")


def cmd_train(args: argparse.Namespace) -> None:
    from vlmlab.api import build
    from vlmlab.errors import ConfigError
    from vlmlab.presets import PRESETS
    from vlmlab.training.trainer import Trainer, TrainOptions, seed_everything

    preset = PRESETS[args.preset]()
    stages = preset.recipe
    if args.stages:
        by_name = {s.name: s for s in stages}
        unknown = [n for n in args.stages if n not in by_name]
        if unknown:
            raise ConfigError(
                f"--stages: unknown stage(s) {unknown}; preset {args.preset!r} has {list(by_name)}"
            )
        stages = [by_name[n] for n in args.stages]
    if args.steps:
        stages = [dataclasses.replace(s, steps=args.steps) for s in stages]
    if args.lr:
        # Per-part learning rates for every stage that trains that part (e.g. --lr vision=3e-4).
        stages = [
            dataclasses.replace(s, lr={**s.lr, **{k: v for k, v in args.lr if k in s.train}}) for s in stages
        ]
    seed_everything(args.seed)  # the initial weights are part of the run: same seed, same numbers
    model, processor = build(preset)
    trainer = Trainer(
        model,
        processor,
        stages,
        TrainOptions(
            run_dir=Path(args.run_dir),
            data_root=Path(args.data),
            seed=args.seed,
            bf16=args.bf16,
            save_every=args.save_every,
            progress=not args.no_progress,
        ),
    )
    result = trainer.fit(resume=args.resume)
    print(f"trained: {result['global_step']} steps; checkpoints in {Path(args.run_dir) / 'checkpoints'}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.cvbench:
        _eval_cvbench(args)
        return
    from vlmlab.api import load
    from vlmlab.data.dataset import load_stage_records
    from vlmlab.evaluation.evaluate import evaluate, markdown_table, write_results

    model, processor = load(args.checkpoint)
    records = load_stage_records([args.split_file], args.data, None)
    if args.limit:
        records = records[: args.limit]
    result, rows = evaluate(model, processor, records, blind_baseline=not args.no_blind)
    out = Path(args.out or args.checkpoint)
    write_results(result, rows, out)
    print(markdown_table(result), end="")
    print(f"results: {out / 'eval.json'}")


def _eval_cvbench(args: argparse.Namespace) -> None:
    from vlmlab.api import load
    from vlmlab.evaluation import cvbench

    items = cvbench.read_cvbench(args.cvbench)  # a bad record fails before the model loads
    if args.limit:
        items = items[: args.limit]
    model, processor = load(args.checkpoint)
    result, rows = cvbench.evaluate_cvbench(
        model, processor, items, rule=args.answer_rule, blind_baseline=not args.no_blind
    )
    path = cvbench.write_cvbench_results(result, rows, Path(args.out or args.checkpoint))
    print(cvbench.markdown_table(result), end="")
    print(f"results: {path}")


def cmd_chat(args: argparse.Namespace) -> None:
    from vlmlab.api import load
    from vlmlab.inference.chat import answer

    model, processor = load(args.checkpoint)
    print(
        answer(
            model,
            processor,
            args.question,
            images=args.image or [],
            videos=args.video or [],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop or (),
        )
    )


def cmd_export(args: argparse.Namespace) -> None:
    from vlmlab.api import load, save

    model, processor = load(args.checkpoint)
    files = save(model, processor, args.out, format=args.format)
    print(f"{args.out} ({args.format}): {', '.join(files)}")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_serve(args: argparse.Namespace) -> None:
    from vlmlab.errors import ConfigError

    api_key = os.environ.get("VLMLAB_API_KEY") or None
    if api_key is None and args.host not in LOOPBACK:
        raise ConfigError(
            f"--host {args.host}: refusing to serve beyond this machine without an API key "
            "(set VLMLAB_API_KEY)"
        )
    import uvicorn

    from vlmlab.api import load
    from vlmlab.serving.app import create_app
    from vlmlab.serving.limits import Limits

    limits = Limits(
        remote_urls=bool(args.allow_image_domain),
        allowed_domains=tuple(args.allow_image_domain or ()),
        max_images_per_request=args.max_images,
        max_image_pixels=args.max_image_pixels,
    )
    model, processor = load(args.checkpoint)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(
        model,
        processor,
        model_name=name,
        api_key=api_key,
        limits=limits,
        cors_origins=args.cors_origin or (),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
    )
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    log.info(
        "serving %s at %s (%s)", name, where, "API key required" if api_key else "no API key: loopback only"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=args.access_log)


def cmd_demo(args: argparse.Namespace) -> None:
    from vlmlab.demo import run_demo

    run_demo(Path(args.run_dir), Path(args.world), seed=args.seed, progress=not args.no_progress)


def cmd_bench(args: argparse.Namespace) -> None:
    from vlmlab.bench import format_table, run_bench
    from vlmlab.io import atomic_write_json

    result = run_bench("quick" if args.quick else "mid", threads=args.threads, bf16=args.bf16)
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"results: {out}")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    import torch

    from vlmlab.api import build, load
    from vlmlab.io import atomic_write_json
    from vlmlab.serving.bench import format_table, run_bench_serve

    # The clients run in a process of their own on this machine: leave them a core, or torch's spinning threads
    # and theirs slow each other down (on a 2-core machine, 10x).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    model, processor = load(args.checkpoint) if args.checkpoint else build(args.preset, load_pretrained=False)
    result = run_bench_serve(
        model,
        processor,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
    )
    result["settings"]["model"] = args.checkpoint or f"preset {args.preset} (random weights)"
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"results: {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmlab", description="Build, train, evaluate and serve vision-language models."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("presets", help="list the presets and their training recipes")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser(
        "inspect",
        help="a preset's parts, parameter counts, trainable parameters per stage and visual tokens per image",
    )
    s.add_argument("preset", help="a preset name (vlmlab presets)")
    s.add_argument(
        "--image-size",
        type=_image_size,
        action="append",
        metavar="HxW",
        help="image height x width to count visual tokens for (repeatable; default: the preset's view size)",
    )
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("world", help="write the embedded synthetic world (LLaVA JSON + PNG images)")
    s.add_argument("--out", default="world", help="output directory (default: world)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=_positive_int, default=4000, help="train records per task")
    s.add_argument(
        "--captions", type=int, default=8000, help="train caption records (the align stage's data)"
    )
    s.add_argument("--val", type=_positive_int, default=100, help="val records per task")
    s.add_argument("--test", type=_positive_int, default=200, help="test records per task")
    s.set_defaults(fn=cmd_world)

    s = sub.add_parser("train", help="train a preset through its staged recipe")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--data", required=True, help="data root: the stages' data files are relative to it")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--stages", nargs="+", help="run only these stages of the recipe, in this order")
    s.add_argument("--steps", type=_positive_int, help="override every stage's number of steps")
    s.add_argument(
        "--lr",
        type=_part_lr,
        action="append",
        metavar="PART=LR",
        help="override a part's learning rate in every stage that trains it (repeatable)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bf16", action="store_true", help="bf16 autocast")
    s.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (0: end of each stage)"
    )
    s.add_argument(
        "--resume", action="store_true", help="continue exactly from the newest complete checkpoint"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "eval",
        help="accuracy per task with the blind (blank-image) baseline, or a CV-Bench file's score (--cvbench)",
    )
    s.add_argument("--checkpoint", required=True, help="a model directory or training checkpoint")
    s.add_argument("--data", default=None, help="data root (split file is relative to it)")
    s.add_argument("--split-file", default="test.json", help="records to score (default: test.json)")
    s.add_argument(
        "--out",
        help="where to write eval.json / eval.md (cvbench.json / cvbench.md) (default: the checkpoint directory)",
    )
    s.add_argument("--limit", type=int, default=0, help="score only the first N records")
    s.add_argument("--no-blind", action="store_true", help="skip the blind baseline")
    s.add_argument(
        "--cvbench",
        metavar="FILE",
        help="score a CV-Bench file instead of --data/--split-file (.jsonl or .json, .parquet with pyarrow; "
        "images relative to it or embedded): accuracy per source, 2D, 3D and the overall CV-Bench score",
    )
    s.add_argument(
        "--answer-rule",
        choices=("cambrian", "lmms-eval"),
        default="cambrian",
        help="how --cvbench reads the answer letter: Cambrian-1's evaluation (default) or lmms-eval's",
    )
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("chat", help="answer one question about images or videos from the command line")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--image", action="append", help="an image file (repeat for several)")
    s.add_argument("--video", action="append", help="a video file, decoded with PyAV (repeat for several)")
    s.add_argument("question")
    s.add_argument("--max-new-tokens", type=_positive_int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", help="stop string (repeat for several)")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser(
        "export",
        help="write a model directory in another format: transformers' (weights, config, tokenizer, processor) "
        "or vlmlab's",
        description="Load a vlmlab model directory, a training checkpoint or a transformers checkpoint directory "
        "and write it, atomically, as --format hf (what transformers' own class, AutoProcessor and engines "
        "built on transformers load) or --format vlmlab.",
    )
    s.add_argument(
        "checkpoint", help="a vlmlab model directory, training checkpoint or transformers directory"
    )
    s.add_argument("out", help="the directory to write (an existing model directory there is replaced)")
    s.add_argument("--format", choices=["hf", "vlmlab"], default="hf")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server (chat completions with images, streaming) and a chat page",
        description="Serve a checkpoint over HTTP: POST /v1/chat/completions, GET /v1/models, GET /health, "
        "and a chat page at /. The API key is read from the VLMLAB_API_KEY environment variable (never from "
        "the command line, where other users could see it); without one the server only binds loopback.",
    )
    s.add_argument(
        "--checkpoint", required=True, help="a vlmlab model or checkpoint, or a transformers directory"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--model-name", help="the model id clients send (default: the checkpoint's directory name)"
    )
    s.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together")
    s.add_argument("--max-queue", type=_positive_int, default=64, help="waiting sequences before 503")
    s.add_argument("--max-images", type=_positive_int, default=8, help="images per request")
    s.add_argument("--max-image-pixels", type=_positive_int, default=4096 * 4096, help="pixels per image")
    s.add_argument(
        "--allow-image-domain",
        action="append",
        help="fetch http(s) image URLs from this host (exact, or *.example.com; repeat). Default: data: URIs only",
    )
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeat)")
    s.add_argument(
        "--access-log", action="store_true", help="log each request line (never headers or bodies)"
    )
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("demo", help="build the world, train tiny through both stages, evaluate, answer")
    s.add_argument("--run-dir", default="runs/demo")
    s.add_argument("--world", default="runs/world")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "bench",
        help="vlmlab against transformers' LlavaForConditionalGeneration (same weights): speed ratios",
    )
    s.add_argument("--out", default="runs/bench/bench.json", help="where to write the JSON results")
    s.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's own choice)")
    s.add_argument("--bf16", action="store_true", help="also time the training step under bf16 autocast")
    s.add_argument(
        "--quick", action="store_true", help="a tiny model: seconds, for tests (figures mean nothing)"
    )
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser(
        "bench-serve",
        help="concurrent streaming clients against vlmlab serve on loopback: batched vs one-at-a-time",
    )
    s.add_argument("--checkpoint", help="a model to serve (default: --preset with random weights)")
    s.add_argument("--preset", default="tiny", help="the preset built when no checkpoint is given")
    s.add_argument("--concurrency", type=_positive_int, default=8, help="concurrent clients (and batch rows)")
    s.add_argument("--requests", type=_positive_int, default=32, help="requests in all")
    s.add_argument("--max-tokens", type=_positive_int, default=96, help="tokens per answer (greedy)")
    s.add_argument("--threads", type=_positive_int, help="torch threads of the server (default: cores - 1)")
    s.add_argument("--out", default="runs/bench/serve.json", help="where to write the JSON results")
    s.set_defaults(fn=cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from vlmlab.errors import VlmlabError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.fn(args)
    except VlmlabError as e:
        if args.verbose:
            raise
        print(f"vlmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
