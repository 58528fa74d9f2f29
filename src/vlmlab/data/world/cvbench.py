"""CV-Bench-style tasks in the embedded world (Cambrian-1's benchmark, SYSTEMS.md §20), opt-in:
``build_world(..., extra_tasks=CVBENCH_TASKS)``, which also writes the test split as a CV-Bench file
(``cvbench-test.jsonl``, read by ``vlmlab.evaluation.cvbench`` and ``vlmlab eval --cvbench``).

CV-Bench's four multiple-choice tasks, asked in its words, with its prompt:

- ``cv-count`` (2D Count): "How many circles are in the image?", options 0 to 3; shapes of other kinds distract;
- ``cv-relation`` (2D Relation): where the first named object is with respect to the second, left/right or
  above/below, always clear-cut (``tasks.relation_of``);
- ``cv-depth`` (3D Depth): which of two objects is closer to the camera;
- ``cv-distance`` (3D Distance): which of two objects is closer, in the scene and not in the image, to a third.

**Sources** (the score's slots): the 2D questions come half from ``world2d-a`` (sparse: the world's 48-96 px
canvases, objects 18-28% of the shorter side, at most one distractor), half from ``world2d-b`` (cluttered:
80-128 px, objects 12-20%, two or three distractors), as CV-Bench's come from ADE20K and COCO; the 3D ones from
``world3d``, Omni3D's slot.

**Perspective scenes** (``GroundScene``): a pinhole camera ``CAMERA_HEIGHT`` above flat ground, looking level,
focal length f = the image width in pixels; sky above the horizon row, ground below. Every object is an upright
shape of the same side S = ``OBJECT_SIDE``, facing the camera, standing at ground position (X, Z), Z the depth
along the view axis. It projects to a square of side f·S/Z whose bottom edge is at row horizon + f·h/Z, centred on
column W/2 + f·X/Z: the nearer of two objects is lower in the image and larger (both cues of one depth). Positions
are drawn in 3D (uniform over the visible image rows and columns) and then projected and rounded to whole pixels,
which keeps the order (never higher, never smaller). Depth questions name two objects at least ``DEPTH_RATIO``
apart in depth, distance questions two whose ground distances to the reference differ by ``DISTANCE_RATIO`` at
least: no answer is borderline. The distance answer is not the image's: the object nearer the reference in the
image is the nearer in the scene for 66% of the questions (4,000 drawn), so reading it off the picture plane is
little better than chance.

**Records**: the human turn is exactly what the CV-Bench evaluation sends (``model_prompt``: ``<image>``, the
CV-Bench prompt, Cambrian's answer instruction) and the answer is the gold letter ("A"); ``evaluate`` scores these
tasks with Cambrian's parser. Options: the objects in the order the question names them, counts 0 to 3, left/right
or above/below. Targets, balanced by ``generate_split``, are (source, letter) pairs, letter-major, so any count of
records covers both 2D sources and balances the letters.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmlab.data.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    _draw_shape,
    overlaps,
    place_sized,
)
from vlmlab.data.world.tasks import TASK_SPECS, Sample, TaskSpec, relation_of
from vlmlab.evaluation.cvbench import cvbench_prompt, model_prompt, slot_type
from vlmlab.io import atomic_write_text

CVBENCH_TASKS = ("cv-count", "cv-relation", "cv-depth", "cv-distance")
CV_TASK_NAMES = {
    "cv-count": "Count",
    "cv-relation": "Relation",
    "cv-depth": "Depth",
    "cv-distance": "Distance",
}
SOURCES_2D = ("world2d-a", "world2d-b")
SOURCE_3D = "world3d"
CVBENCH_FILE = "cvbench-{split}.jsonl"
CVBENCH_SPLIT = "test"

COUNT_CHOICES = ("0", "1", "2", "3")
AXES = (("left", "right"), ("above", "below"))
COUNT_QUESTION = "How many {0}s are in the image?"
RELATION_QUESTION = (
    "Considering the relative positions of the {0} and the {1} in the image provided, "
    "where is the {0} located with respect to the {1}?"
)
DEPTH_QUESTION = "Which object is closer to the camera taking this photo, the {0} or the {1}?"
DISTANCE_QUESTION = (
    "Estimate the real-world distances between objects in this image. "
    "Which object is closer to the {0}, the {1} or the {2}?"
)


@dataclass(frozen=True)
class Style:
    """How a 2D source draws its scenes."""

    sides: tuple[int, int]
    """Image width and height range in pixels, each drawn independently."""
    object_size: tuple[float, float]
    """Object box side as a fraction of the shorter image side."""
    distractors: tuple[int, int]
    """Unnamed extra objects, inclusive range (a count scene has at least one object in all)."""


STYLES = {
    "world2d-a": Style((48, 96), (0.18, 0.28), (0, 1)),
    "world2d-b": Style((80, 128), (0.12, 0.20), (2, 3)),
}

# --- perspective scenes -----------------------------------------------------------------------------------------
SKY = (205, 225, 245)
GROUND = (195, 185, 160)
SIDES_3D = (64, 96)  # image width and height range, pixels
HORIZON = (0.25, 0.40)  # first ground row as a fraction of the height
CAMERA_HEIGHT = 1.0  # the unit of ground positions
# Every object's side, in camera heights: drawn, its side is half the rows from the horizon down to its base.
OBJECT_SIDE = 0.5
MIN_OBJECT_PX = 7  # the farthest objects are drawn this big at least, so their shape stays legible
DEPTH_RATIO = 1.3  # depth questions: far depth / near depth >= this
DISTANCE_RATIO = 1.5  # distance questions: far distance / near distance >= this
_MAX_TRIES = 200


@dataclass(frozen=True)
class GroundScene(Scene):
    """A perspective view of objects standing on flat ground; ``objects[i]`` is the projection of
    ``positions[i]``. Draws itself (``render``): sky above row ``horizon``, ground from it down."""

    horizon: int
    """The first ground row."""
    positions: tuple[tuple[float, float], ...]
    """Each object's ground position (X, Z) in camera heights: X to the right of the view axis, Z along it."""

    def signature(self) -> tuple:
        return (*super().signature(), self.horizon)

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), SKY)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, self.horizon, self.width - 1, self.height - 1), fill=GROUND)
        for obj in self.objects:  # boxes never overlap, so the drawing order does not matter
            _draw_shape(draw, obj, COLOURS[obj.colour])
        return image


def project(x: float, z: float, width: int, horizon: int) -> tuple[float, float, float]:
    """Where an object at ground position (x, z) appears: (centre column, bottom row, side), in unrounded pixels."""
    focal = width
    return width / 2 + focal * x / z, horizon + focal * CAMERA_HEIGHT / z, focal * OBJECT_SIDE / z


@dataclass(frozen=True)
class ChoiceSample(Sample):
    """A multiple-choice sample with the fields its CV-Bench record needs (defaults only because ``Sample``'s
    last fields have them; every generator sets them)."""

    question: str = ""
    choices: tuple[str, ...] = ()
    source: str = ""
    target_class: str | None = None
    """The counted class (count questions)."""
    boxes: tuple[tuple[int, int, int, int], ...] | None = None
    """The named objects' boxes ``(x1, y1, x2, y2)``, exclusive right/bottom, in naming order (3D questions,
    like Omni3D's ``bbox``)."""


@dataclass(frozen=True)
class ChoiceTaskSpec(TaskSpec):
    """A task whose targets are (source, letter) pairs; its closed answer set is the letters."""

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(sorted({letter for _, letter in self.targets}))


def _targets(sources: tuple[str, ...], n_choices: int) -> tuple[tuple[str, str], ...]:
    return tuple((source, chr(ord("A") + i)) for i in range(n_choices) for source in sources)


def _choice_sample(
    task: str, scene: Scene, question: str, choices: Sequence[str], letter: str, source: str, **extra
) -> ChoiceSample:
    prompt = model_prompt(cvbench_prompt(question, choices))
    return ChoiceSample(
        task, scene, prompt, letter, question=question, choices=tuple(choices), source=source, **extra
    )


def _name(kind: tuple[str, str]) -> str:
    shape, colour = kind
    return f"{colour} {shape}"


def _named_kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (shape, colour) kinds, no two sharing a shape or a colour."""
    return list(zip(rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)))


# --- 2D ---------------------------------------------------------------------------------------------------------


def make_count(rng: random.Random, target: tuple[str, str]) -> ChoiceSample:
    """``k`` objects of one shape (any colours) among distractors of the other shapes; the answer is ``k``."""
    source, letter = target
    style = STYLES[source]
    k = ord(letter) - ord("A")
    shape = rng.choice(SHAPES)
    others = [s for s in SHAPES if s != shape]
    while True:
        distractors = rng.randint(max(style.distractors[0], 1 - k), style.distractors[1])
        kinds = [(shape, rng.choice(list(COLOURS))) for _ in range(k)]
        kinds += [(rng.choice(others), rng.choice(list(COLOURS))) for _ in range(distractors)]
        width, height, background = _canvas(rng, style)
        objects = _place(rng, width, height, kinds, style)
        if objects is not None:
            scene = Scene(width, height, background, objects)
            question = COUNT_QUESTION.format(shape)
            return _choice_sample(
                "cv-count", scene, question, COUNT_CHOICES, letter, source, target_class=shape
            )


def make_relation(rng: random.Random, target: tuple[str, str]) -> ChoiceSample:
    """Two named objects (distinct colours and shapes), clearly apart along one axis, plus distractors that
    share no named object's colour-and-shape."""
    source, letter = target
    style = STYLES[source]
    named = _named_kinds(rng, 2)
    choices = rng.choice(AXES)
    relation = choices[ord(letter) - ord("A")]
    while True:
        width, height, background = _canvas(rng, style)
        pair = _relation_pair(rng, width, height, named, relation, style)
        if pair is None:
            continue
        n = rng.randint(*style.distractors)
        kinds = [k for k in ((s, c) for s in SHAPES for c in COLOURS) if k not in named]
        objects = _place(rng, width, height, [rng.choice(kinds) for _ in range(n)], style, placed=pair)
        if objects is not None:
            scene = Scene(width, height, background, objects)
            question = RELATION_QUESTION.format(*map(_name, named))
            return _choice_sample("cv-relation", scene, question, choices, letter, source)


def _relation_pair(rng, width, height, named, relation, style) -> tuple[Obj, Obj] | None:
    sizes = [_size(rng, width, height, style) for _ in named]
    for _ in range(10 * _MAX_TRIES):  # rejection sampling accepts a few percent of draws
        a, b = (
            Obj(shape, colour, rng.randint(0, width - size), rng.randint(0, height - size), size)
            for (shape, colour), size in zip(named, sizes)
        )
        if relation_of(a, b, width, height) == relation and not overlaps(a, b):
            return a, b
    return None


def _canvas(rng: random.Random, style: Style) -> tuple[int, int, str]:
    return rng.randint(*style.sides), rng.randint(*style.sides), rng.choice(list(BACKGROUNDS))


def _size(rng: random.Random, width: int, height: int, style: Style) -> int:
    side = min(width, height)
    low, high = style.object_size
    return rng.randint(math.ceil(low * side), math.floor(high * side))


def _place(rng, width, height, kinds, style, placed=()) -> tuple[Obj, ...] | None:
    """``placed`` plus one object per (shape, colour) kind at a random free place (None when one did not fit)."""
    size = lambda kind: _size(rng, width, height, style)  # noqa: E731
    return place_sized(rng, width, height, kinds, size, placed=tuple(placed), max_tries=_MAX_TRIES)


# --- 3D ---------------------------------------------------------------------------------------------------------


def make_depth(rng: random.Random, target: tuple[str, str]) -> ChoiceSample:
    """Two named objects at depths at least ``DEPTH_RATIO`` apart; the first named is the closer for "A"."""
    _, letter = target
    kinds = _named_kinds(rng, 2)
    while True:
        width, height, horizon = _ground_canvas(rng)
        near, far = sorted((_ground_point(rng, width, height, horizon) for _ in kinds), key=lambda p: p[1])
        if far[1] / near[1] < DEPTH_RATIO:
            continue
        scene = _ground_scene(width, height, horizon, kinds, [near, far] if letter == "A" else [far, near])
        if scene is not None:
            names = [_name(k) for k in kinds]
            question = DEPTH_QUESTION.format(*names)
            return _choice_sample("cv-depth", scene, question, names, letter, SOURCE_3D, boxes=_boxes(scene))


def make_distance(rng: random.Random, target: tuple[str, str]) -> ChoiceSample:
    """A reference and two named objects whose ground distances to it differ by ``DISTANCE_RATIO`` at least; the
    first of the two is the closer for "A"."""
    _, letter = target
    kinds = _named_kinds(rng, 3)
    while True:
        width, height, horizon = _ground_canvas(rng)
        ref, *pair = (_ground_point(rng, width, height, horizon) for _ in kinds)
        near, far = sorted(pair, key=lambda p: math.dist(ref, p))
        if math.dist(ref, far) < DISTANCE_RATIO * math.dist(ref, near):
            continue
        scene = _ground_scene(
            width, height, horizon, kinds, [ref, near, far] if letter == "A" else [ref, far, near]
        )
        if scene is not None:
            names = [_name(k) for k in kinds]
            question = DISTANCE_QUESTION.format(*names)
            return _choice_sample(
                "cv-distance", scene, question, names[1:], letter, SOURCE_3D, boxes=_boxes(scene)
            )


def _ground_canvas(rng: random.Random) -> tuple[int, int, int]:
    width, height = rng.randint(*SIDES_3D), rng.randint(*SIDES_3D)
    return width, height, round(rng.uniform(*HORIZON) * height)


def _ground_point(rng: random.Random, width: int, height: int, horizon: int) -> tuple[float, float]:
    """A ground position whose object is visible and at least ``MIN_OBJECT_PX`` big: its base row is uniform
    between the farthest allowed row and the image bottom, its centre column uniform where the box fits."""
    focal = width
    bottom = rng.uniform(horizon + MIN_OBJECT_PX * CAMERA_HEIGHT / OBJECT_SIDE, height)
    z = focal * CAMERA_HEIGHT / (bottom - horizon)
    side = focal * OBJECT_SIDE / z
    column = rng.uniform(side / 2, width - side / 2)
    return (column - width / 2) * z / focal, z


def _ground_scene(width, height, horizon, kinds, positions) -> GroundScene | None:
    """The objects of ``kinds`` at ``positions``, projected; None when two boxes overlap."""
    objects: list[Obj] = []
    for (shape, colour), (x, z) in zip(kinds, positions):
        column, bottom, side = project(x, z, width, horizon)
        size = round(side)
        left = min(max(round(column - side / 2), 0), width - size)  # rounding may push a box 1 px outside
        obj = Obj(shape, colour, left, round(bottom) - size, size)
        if any(overlaps(obj, other) for other in objects):
            return None
        objects.append(obj)
    return GroundScene(width, height, "ground", tuple(objects), horizon, tuple(positions))


def _boxes(scene: Scene) -> tuple[tuple[int, int, int, int], ...]:
    return tuple((o.x, o.y, o.x + o.size, o.y + o.size) for o in scene.objects)


# --- the CV-Bench file ------------------------------------------------------------------------------------------


def cvbench_record(idx: int, record_id: str, image: str, sample: ChoiceSample, seed: int) -> dict:
    """The CV-Bench record of one sample; ``image``: its file, relative to the CV-Bench file's folder."""
    return {
        "idx": idx,
        "type": slot_type(sample.source),
        "task": CV_TASK_NAMES[sample.task],
        "question": sample.question,
        "choices": list(sample.choices),
        "answer": f"({sample.answer})",
        "prompt": cvbench_prompt(sample.question, sample.choices),
        "filename": image,
        "source": sample.source,
        "source_dataset": f"vlmlab world (seed {seed})",
        "source_filename": Path(image).name,
        "target_class": sample.target_class,
        "target_size": None,
        "bbox": None if sample.boxes is None else [list(box) for box in sample.boxes],
    }


def write_cvbench_file(
    out_dir: str | os.PathLike, split: str, samples: Iterable[tuple[str, Sample]], seed: int
) -> Path:
    """Write ``cvbench-<split>.jsonl`` into the world folder ``out_dir``: one CV-Bench record per multiple-choice
    sample of ``samples`` (``(record id, sample)`` of the split, as written), its image the one the split's
    record uses (``images/<split>/<id>.png``, ``generate.py``'s layout). Returns its path."""
    path = Path(out_dir) / CVBENCH_FILE.format(split=split)
    choice = [(rid, s) for rid, s in samples if isinstance(s, ChoiceSample)]
    lines = [
        json.dumps(cvbench_record(i, rid, f"images/{split}/{rid}.png", s, seed)) + "\n"
        for i, (rid, s) in enumerate(choice)
    ]
    atomic_write_text(path, "".join(lines))
    return path


def build_cvbench(out_dir: str | os.PathLike, *, seed: int = 0, n_per_task: int = 50) -> Path:
    """A world of only the CV-Bench tasks' test split (``n_per_task`` questions each) in ``out_dir``; returns
    the path of its CV-Bench file."""
    from vlmlab.data.world.generate import build_world  # generate.py imports this module

    splits = {"train": 0, "val": 0, "test": n_per_task}
    build_world(out_dir, seed=seed, n_per_task=splits, n_captions=0, tasks=(), extra_tasks=CVBENCH_TASKS)
    return Path(out_dir) / CVBENCH_FILE.format(split=CVBENCH_SPLIT)


TASK_SPECS["cv-count"] = ChoiceTaskSpec("cv-count", _targets(SOURCES_2D, 4), make_count)
TASK_SPECS["cv-relation"] = ChoiceTaskSpec("cv-relation", _targets(SOURCES_2D, 2), make_relation)
TASK_SPECS["cv-depth"] = ChoiceTaskSpec("cv-depth", _targets((SOURCE_3D,), 2), make_depth)
TASK_SPECS["cv-distance"] = ChoiceTaskSpec("cv-distance", _targets((SOURCE_3D,), 2), make_distance)
