"""Writing the synthetic world to disk: seeded, balanced, split-disjoint LLaVA JSON files plus PNG images.

Layout of ``out_dir``::

    images/<split>/<id>.png      one image per record, e.g. images/train/train-colour-000012.png
    images/<split>/<id>-<k>.png  the k-th image (k = 0, 1, ...) of a multi-image record (``multi`` task)
    videos/<split>/<id>.mp4      the clip of a video record (``video`` task)
    <split>.json                 LLaVA records: {"id", "image" (relative to out_dir), "conversations", "task"};
                                 "image" is a list for multi-image records, and video records have "video" instead
    cvbench-test.jsonl           with the CV-Bench tasks (``cvbench.CVBENCH_TASKS``): their test records as a
                                 CV-Bench file, sharing the images of test.json
    world.json                   the settings and counts; written last, so it exists only for a complete build

The tasks in ``EXTRA_TASKS`` (``detail``, ``video``, ``multi``) are generated only when asked for with
``build_world(..., extra_tasks=...)``; without them the output is byte-identical to a build before they existed.

Determinism: every (seed, split, task) has its own ``random.Random`` derived by hashing, and PNGs carry no
timestamp, and mp4s are encoded single-threaded, so equal settings give byte-identical files. Splits are generated
test -> val -> train and a scene whose canonical signature (``Sample.signatures``) was already used anywhere is
rejected, so no image repeats across splits, and the test set does not change when only the train size does.
Extra tasks are drawn after every split of the default tasks, checked against all of them: asking for them never
changes a default record, and no image repeats across splits. The price: an extra task's test records can change
with the default train size, in the rare case where one of its images (``multi``) matches a default train scene.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from vlmlab.data.formats import write_json_atomic, write_llava_json
from vlmlab.data.world.cvbench import CVBENCH_SPLIT, CVBENCH_TASKS, write_cvbench_file
from vlmlab.data.world.extra_tasks import EXTRA_TASKS
from vlmlab.data.world.grounding import GROUNDING_TASKS
from vlmlab.data.world.scenes import Scene, render
from vlmlab.data.world.tasks import CAPTION, TASK_SPECS, TASKS, Sample
from vlmlab.errors import ConfigError

WORLD_VERSION = (
    1  # bump when generation changes, so an old world.json no longer matches and the world is rebuilt
)
SPLITS = ("test", "val", "train")  # generation order (see the module docstring)
DEFAULT_N_PER_TASK = {"train": 2000, "val": 100, "test": 200}
DEFAULT_N_CAPTIONS = {"train": 4000, "val": 0, "test": 0}
# Scenes drawn per record before giving up: only reached when the requested counts exhaust the scene space.
MAX_SCENE_ATTEMPTS = 1000
PNG_OPTIONS = {"optimize": False, "compress_level": 1}  # fast to write; the images are tiny anyway
VIDEO_FPS = 4  # 8 frames = a 2-second clip


def split_seed(seed: int, split: str, task: str) -> int:
    """An independent 64-bit seed per (seed, split, task), stable across Python versions and processes."""
    digest = hashlib.sha256(f"vlmlab-world/{seed}/{split}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_split(
    split: str, counts: Mapping[str, int], *, seed: int, seen: set | None = None
) -> Iterator[tuple[str, Sample]]:
    """Yield ``(id, sample)`` for ``counts[task]`` samples of each task, answers balanced exactly.

    Scenes whose signature is in ``seen`` are redrawn; accepted signatures are added to it (pass one set across
    splits to keep them disjoint).
    """
    seen = set() if seen is None else seen
    for task, n in counts.items():
        spec = TASK_SPECS[task]
        rng = random.Random(split_seed(seed, split, task))
        # Each answer (or caption object count) n // k or n // k + 1 times, in a seeded random order.
        targets = [spec.targets[i % len(spec.targets)] for i in range(n)]
        rng.shuffle(targets)
        for i, target in enumerate(targets):
            for _ in range(MAX_SCENE_ATTEMPTS):
                sample = spec.make(rng, target)
                signatures = sample.signatures()
                if len(set(signatures)) == len(signatures) and seen.isdisjoint(signatures):
                    seen.update(signatures)
                    break
            else:
                raise ConfigError(
                    f"world: cannot draw {n} distinct '{task}' scenes for split '{split}'; ask for fewer"
                )
            yield f"{split}-{task}-{i:06d}", sample


def build_world(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_per_task: Mapping[str, int] | int | None = None,
    n_captions: Mapping[str, int] | int | None = None,
    tasks: Sequence[str] = TASKS,
    extra_tasks: Sequence[str] = (),
) -> dict:
    """Generate the world into ``out_dir`` (or reuse it when ``world.json`` records identical settings).

    ``n_per_task``: records per QA task per split (default ``DEFAULT_N_PER_TASK``); ``n_captions``: caption
    records per split (default ``DEFAULT_N_CAPTIONS``). An int means that many in every split; a dict's missing
    splits get 0. ``extra_tasks``: any of ``EXTRA_TASKS`` ("detail", "video", "multi"), ``GROUNDING_TASKS`` and
    ``CVBENCH_TASKS``, ``n_per_task`` records each, in the same split files. Returns the summary stored in
    ``world.json`` plus ``out_dir`` and ``regenerated``.
    """
    out_dir = Path(out_dir)
    settings = {
        "version": WORLD_VERSION,
        "seed": seed,
        "tasks": _check_tasks(tasks, TASKS),
        "n_per_task": _per_split(n_per_task, DEFAULT_N_PER_TASK, "n_per_task"),
        "n_captions": _per_split(n_captions, DEFAULT_N_CAPTIONS, "n_captions"),
    }
    if extra_tasks:  # only when asked: a default build's world.json stays byte-identical to older builds
        settings["extra_tasks"] = _check_tasks(extra_tasks, (*EXTRA_TASKS, *GROUNDING_TASKS, *CVBENCH_TASKS))
    summary_path = out_dir / "world.json"
    existing = _read_summary(summary_path)
    if existing is not None and existing.get("settings") == settings and _complete(out_dir, existing):
        _write_preferences(out_dir, settings)  # a world built before the preference files existed
        return {**existing, "out_dir": str(out_dir), "regenerated": False}

    # A stale world.json must not vouch for a half-rewritten world if this build is interrupted.
    summary_path.unlink(missing_ok=True)
    seen: set = set()
    counts, samples = {}, {}
    for split in SPLITS:
        split_counts = {task: settings["n_per_task"][split] for task in settings["tasks"]}
        if settings["n_captions"][split]:
            split_counts[CAPTION] = settings["n_captions"][split]
        samples[split] = list(generate_split(split, split_counts, seed=seed, seen=seen))
        counts[split] = split_counts
    # Second pass, after every default split, so the default records never depend on the extra tasks.
    extra = settings.get("extra_tasks", [])
    for split in SPLITS:
        extra_counts = {task: settings["n_per_task"][split] for task in extra}
        samples[split] += generate_split(split, extra_counts, seed=seed, seen=seen)
        counts[split].update(extra_counts)
    for split in SPLITS:
        _write_split(out_dir, split, samples[split])
    if set(extra) & set(CVBENCH_TASKS):
        write_cvbench_file(out_dir, CVBENCH_SPLIT, samples[CVBENCH_SPLIT], seed)

    summary = {
        "settings": settings,
        "counts": counts,
        "answers": {
            task: None if TASK_SPECS[task].answers is None else list(TASK_SPECS[task].answers)
            for task in [*settings["tasks"], *extra]
        },
        "files": {split: f"{split}.json" for split in SPLITS},
    }
    _write_preferences(out_dir, settings)
    write_json_atomic(summary_path, summary)
    return {**summary, "out_dir": str(out_dir), "regenerated": True}


def _write_preferences(out_dir: Path, settings: dict) -> None:
    """With the video task: its DPO preference pairs per split (``preferences-<split>.json``, the true direction
    chosen over the opposite one), the data of ``llava-next-video-tiny``'s DPO stage."""
    from vlmlab.data.world.preferences import PREFERENCE_FILE, write_preferences

    if "video" not in settings.get("extra_tasks", []):
        return
    for split in SPLITS:
        if settings["n_per_task"][split] and not (out_dir / PREFERENCE_FILE.format(split=split)).is_file():
            write_preferences(out_dir, split)


def to_llava_record(record_id: str, media: str | list[str], sample: Sample) -> dict:
    """The LLaVA JSON record of one sample; ``media`` (relative to the world folder) is the image, the list of
    images of a multi-image sample, or the video of a video sample (LLaVA-NeXT-Video's ``"video"`` key)."""
    return {
        "id": record_id,
        "video" if sample.video else "image": media,
        "conversations": [{"from": "human", "value": sample.prompt}, {"from": "gpt", "value": sample.answer}],
        "task": sample.task,
    }


def _write_split(out_dir: Path, split: str, samples: Iterable[tuple[str, Sample]]) -> None:
    image_dir, video_dir = out_dir / "images" / split, out_dir / "videos" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records, written = [], set()
    for record_id, sample in samples:
        if sample.video:
            media = _write_clip(out_dir, video_dir, record_id, sample)
        elif sample.more_scenes:
            media = [
                _write_image(out_dir, image_dir, f"{record_id}-{k}", s) for k, s in enumerate(sample.scenes)
            ]
        else:
            media = _write_image(out_dir, image_dir, record_id, sample.scene)
        written.update(Path(name).name for name in ([media] if isinstance(media, str) else media))
        records.append(to_llava_record(record_id, media, sample))
    # Files left by an earlier, larger build would otherwise linger; only our own id pattern is removed.
    stale = [*image_dir.glob(f"{split}-*.png"), *video_dir.glob(f"{split}-*.mp4")]
    for path in stale:
        if path.name not in written:
            path.unlink()
    write_llava_json(out_dir / f"{split}.json", records)


def _write_image(out_dir: Path, folder: Path, stem: str, scene: Scene) -> str:
    path = folder / f"{stem}.png"
    # A scene that draws itself (``cvbench.GroundScene``: ground and sky) does; the others are drawn by ``render``.
    (scene.render() if hasattr(scene, "render") else render(scene)).save(path, format="PNG", **PNG_OPTIONS)
    return path.relative_to(out_dir).as_posix()


def _write_clip(out_dir: Path, folder: Path, stem: str, sample: Sample) -> str:
    from vlmlab.processing.video import write_video  # PyAV is loaded only when a world has videos

    path = folder / f"{stem}.mp4"
    write_video(path, [render(scene) for scene in sample.scenes], fps=VIDEO_FPS)
    return path.relative_to(out_dir).as_posix()


def _check_tasks(tasks: Sequence[str], valid: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):  # a single name would otherwise be split into letters
        tasks = [tasks]
    unknown = [task for task in tasks if task not in valid]
    if unknown:
        raise ConfigError(
            f"world: unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(valid)}"
        )
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"world: repeated task in {list(tasks)}")
    return list(tasks)


def _per_split(
    value: Mapping[str, int] | int | None, default: Mapping[str, int], name: str
) -> dict[str, int]:
    if value is None:
        value = default
    counts = dict.fromkeys(SPLITS, value) if isinstance(value, int) else dict(value)
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ConfigError(
            f"world: {name} has unknown split(s) {sorted(unknown)}; valid splits: train, val, test"
        )
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"world: {name}[{split!r}] must be a non-negative integer, got {n!r}")
    return {split: counts.get(split, 0) for split in ("train", "val", "test")}


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: rebuild
        return None
    return summary if isinstance(summary, dict) else None


def _complete(out_dir: Path, summary: dict) -> bool:
    files = summary.get("files")
    return isinstance(files, dict) and all((out_dir / name).is_file() for name in files.values())
