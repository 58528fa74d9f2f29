"""Tasks of the synthetic world: each turns a target answer into a ``Sample`` (a scene, a prompt and the answer).

QA tasks ask one question about one image and expect a short lowercase answer; the ``caption`` task pairs an image
with a one-sentence description (LLaVA's ``plain`` pretraining format: the prompt is the image alone).
Generators receive the answer to produce, so the caller balances answers exactly (see ``generate.py``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from vlmlab.data.world.scenes import (
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    overlaps,
    place_random,
    sample_canvas,
    sample_size,
)
from vlmlab.registry import Registry

IMAGE_PLACEHOLDER = "<image>"  # LLaVA convention: the human turn starts with the placeholder, then a newline

TASKS = ("colour", "shape", "count", "relation", "position")
CAPTION = "caption"

NUMBER_WORDS = ("one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

COLOUR_QUESTIONS = (
    "What color is the shape?",
    "What is the color of the shape?",
    "Which color is this shape?",
)
SHAPE_QUESTIONS = ("What shape is this?", "What is the shape of the object?", "Which shape is shown?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?")
POSITION_QUESTIONS = ("Where is the shape?", "In which part of the image is the shape?")
RELATION_QUESTION = "Where is the {0} {1} relative to the {2} {3}?"

# Relation placement: the separation along the answer axis is at least this fraction of the image side on that
# axis, and at least RELATION_DOMINANCE times the separation on the other axis, so the answer is never borderline.
RELATION_MIN_SEPARATION = 0.4
RELATION_DOMINANCE = 2.0
# Position placement: a corner object's centre is at least this fraction of the side away from the midlines; a
# centred object's centre is within CENTER_TOLERANCE of the image centre on both axes.
CORNER_MARGIN = 0.15
CENTER_TOLERANCE = 0.06
LARGE_OBJECT = (
    0.365  # caption size word: box side >= this fraction of min(w, h) is "large" (midpoint of 28-45%)
)
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class Sample:
    """One generated example: the scene(s) to render, the human turn and the assistant turn."""

    task: str
    scene: Scene
    """The image, or the first image of a multi-image sample, or the first frame of a video sample."""
    prompt: str
    """The human turn: ``"<image>\\n{question}"`` for QA tasks, ``"<image>"`` for captions; one ``<image>`` per
    image of a multi-image sample, ``"<video>\\n{question}"`` for a video sample."""
    answer: str
    more_scenes: tuple[Scene, ...] = ()
    """The further images of a multi-image sample, or the further frames of a video sample."""
    video: bool = False
    """True when ``scenes`` are the frames of one clip (written as one mp4), not separate images."""

    @property
    def scenes(self) -> tuple[Scene, ...]:
        return (self.scene, *self.more_scenes)

    def signatures(self) -> tuple[tuple, ...]:
        """What must not have been drawn before for this sample to be new (``generate_split`` keeps splits
        disjoint with these): every image's ``Scene.signature``; for a video, the whole clip's, so a frame may
        repeat a frame of another clip but the motion may not."""
        if self.video:
            return (("video", tuple(scene.signature() for scene in self.scenes)),)
        return tuple(scene.signature() for scene in self.scenes)


@dataclass(frozen=True)
class TaskSpec:
    """How to generate a task: ``make(rng, target)`` for each target in ``targets``, balanced by the caller."""

    name: str
    targets: tuple
    """The answer set of a QA task; for captions, the object counts (1, 2, 3)."""
    make: Callable[[random.Random, object], Sample]

    @property
    def answers(self) -> tuple[str, ...] | None:
        """The closed answer set, or None for free text (captions)."""
        return None if self.name == CAPTION else self.targets


def _qa(task: str, scene: Scene, question: str, answer: str) -> Sample:
    return Sample(task, scene, f"{IMAGE_PLACEHOLDER}\n{question}", answer)


def make_colour(rng: random.Random, colour: str) -> Sample:
    scene = _single(rng, rng.choice(SHAPES), colour)
    return _qa("colour", scene, rng.choice(COLOUR_QUESTIONS), colour)


def make_shape(rng: random.Random, shape: str) -> Sample:
    scene = _single(rng, shape, rng.choice(list(COLOURS)))
    return _qa("shape", scene, rng.choice(SHAPE_QUESTIONS), shape)


def make_count(rng: random.Random, number: str) -> Sample:
    n = NUMBER_WORDS.index(number) + 1
    # Small sizes even for one object: otherwise "one" would be readable from object size alone.
    scene = _random_scene(rng, [_random_kind(rng) for _ in range(n)], multi=True)
    return _qa("count", scene, rng.choice(COUNT_QUESTIONS), number)


def make_relation(rng: random.Random, relation: str) -> Sample:
    """Two objects differing in colour and shape; the answer is where the first is relative to the second."""
    (colour_a, colour_b), (shape_a, shape_b) = rng.sample(list(COLOURS), 2), rng.sample(SHAPES, 2)
    while True:
        width, height, background = sample_canvas(rng)
        size_a, size_b = (sample_size(rng, width, height, multi=True) for _ in range(2))
        for _ in range(_MAX_TRIES):
            a = Obj(
                shape_a, colour_a, rng.randint(0, width - size_a), rng.randint(0, height - size_a), size_a
            )
            b = Obj(
                shape_b, colour_b, rng.randint(0, width - size_b), rng.randint(0, height - size_b), size_b
            )
            if relation_of(a, b, width, height) == relation and not overlaps(a, b):
                scene = Scene(width, height, background, (a, b))
                question = RELATION_QUESTION.format(colour_a, shape_a, colour_b, shape_b)
                return _qa("relation", scene, question, relation)
        # Rejection sampling accepts a few percent of draws, so this is practically never reached; a fresh
        # canvas and sizes then retry.


def relation_of(a: Obj, b: Obj, width: int, height: int) -> str | None:
    """Where ``a`` is relative to ``b`` ("left", "right", "above", "below"), or None when not clear-cut."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= RELATION_MIN_SEPARATION * width and abs(dx) >= RELATION_DOMINANCE * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= RELATION_MIN_SEPARATION * height and abs(dy) >= RELATION_DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def make_position(rng: random.Random, position: str) -> Sample:
    """One object whose centre lies clearly inside one of five regions."""
    width, height, background = sample_canvas(rng)
    size = sample_size(rng, width, height, multi=False)
    x = rng.randint(*_position_range(position, "left", "right", width, size))
    y = rng.randint(*_position_range(position, "top", "bottom", height, size))
    scene = Scene(
        width, height, background, (Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, size),)
    )
    return _qa("position", scene, rng.choice(POSITION_QUESTIONS), position)


def position_of(obj: Obj, width: int, height: int) -> str | None:
    """The five-region position of ``obj`` as ``make_position`` places it, or None when it is in no clear region."""
    fx, fy = obj.cx / width - 0.5, obj.cy / height - 0.5
    if abs(fx) <= CENTER_TOLERANCE and abs(fy) <= CENTER_TOLERANCE:
        return "center"
    if min(abs(fx), abs(fy)) < CORNER_MARGIN:
        return None
    return f"{'top' if fy < 0 else 'bottom'} {'left' if fx < 0 else 'right'}"


def _position_range(position: str, low_word: str, high_word: str, side: int, size: int) -> tuple[int, int]:
    """Integer range of the box's top-left coordinate on one axis so the centre lands in ``position``."""
    half = size / 2
    if position == "center":
        low, high = side * (0.5 - CENTER_TOLERANCE) - half, side * (0.5 + CENTER_TOLERANCE) - half
    elif low_word in position:
        low, high = 0, side * (0.5 - CORNER_MARGIN) - half
    elif high_word in position:
        low, high = side * (0.5 + CORNER_MARGIN) - half, side - size
    else:
        raise ValueError(f"unknown position {position!r}; valid positions: {', '.join(POSITIONS)}")
    return math.ceil(low), math.floor(high)


def make_caption(rng: random.Random, n_objects: int) -> Sample:
    """A scene of 1-3 objects and a caption naming colour and shape, plus position (one object) or count."""
    scene = _random_scene(rng, [_random_kind(rng) for _ in range(n_objects)], multi=n_objects > 1)
    return Sample(CAPTION, scene, IMAGE_PLACEHOLDER, describe(scene))


def describe(scene: Scene) -> str:
    """The caption of ``scene``: "a large red circle at the top left." or "two shapes: a red circle and a ..."."""
    objects = sorted(scene.objects, key=lambda o: (o.cx, o.cy))  # listed left to right
    if len(objects) == 1:
        (obj,) = objects
        size_word = "large" if obj.size >= LARGE_OBJECT * min(scene.width, scene.height) else "small"
        return f"a {size_word} {obj.colour} {obj.shape} {_grid_phrase(obj, scene)}."
    names = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objects]
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{NUMBER_WORDS[len(objects) - 1]} shapes: {listed}."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_GRID_PHRASES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)


def _grid_phrase(obj: Obj, scene: Scene) -> str:
    """Where the object's centre is on a 3 x 3 grid of thirds (captions cover every position, not only five)."""
    column = min(int(3 * obj.cx / scene.width), 2)
    row = min(int(3 * obj.cy / scene.height), 2)
    return _GRID_PHRASES[row][column]


def _random_kind(rng: random.Random) -> tuple[str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS))


def _single(rng: random.Random, shape: str, colour: str) -> Scene:
    return _random_scene(rng, [(shape, colour)], multi=False)


def _random_scene(rng: random.Random, kinds: list[tuple[str, str]], multi: bool) -> Scene:
    while True:  # placement rarely fails (at most 4 small objects); a fresh canvas then retries
        width, height, background = sample_canvas(rng)
        objects = place_random(rng, width, height, kinds, multi=multi)
        if objects is not None:
            return Scene(width, height, background, objects)


TASK_SPECS = Registry("world task")  # the opt-in tasks (detail, video, multi) are added by extra_tasks.py
TASK_SPECS["colour"] = TaskSpec("colour", tuple(COLOURS), make_colour)
TASK_SPECS["shape"] = TaskSpec("shape", SHAPES, make_shape)
TASK_SPECS["count"] = TaskSpec("count", NUMBER_WORDS, make_count)
TASK_SPECS["relation"] = TaskSpec("relation", RELATIONS, make_relation)
TASK_SPECS["position"] = TaskSpec("position", POSITIONS, make_position)
TASK_SPECS[CAPTION] = TaskSpec(CAPTION, (1, 2, 3), make_caption)
