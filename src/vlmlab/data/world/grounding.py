"""The opt-in referring-expression task ``ground`` (Qwen-VL grounding, SYSTEMS.md §5): ``build_world(...,
extra_tasks=("ground",))``.

An image of 2-4 shapes; the question names one of them by size, colour and shape ("Where is the small red
circle?"), and the answer is its box in Qwen-VL's text form, ``<ref>the small red circle</ref><box>(x1,y1),(x2,y2)
</box>``, corners normalised to 0..999 of the image's width and height (``vlmlab.processing.boxes.encode_box``).
Scored by IoU >= 0.5 against the drawn box (``vlmlab.evaluation.evaluate``).

Why the phrase is unique and needs every word: no other object has the target's colour and shape in the same
size class; half of the scenes hold a decoy of the same colour and shape in the *other* size class (so the size
word matters), and the others decoys that share the colour or the shape (so neither word alone finds it). Sizes:
"small" boxes are 16-22% of the shorter side, "large" ones 32-40%, far enough apart to name without doubt.
Targets (balanced by the caller) are the target's shape.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vlmlab.data.world.scenes import COLOURS, SHAPES, Obj, Scene, place_sized, sample_canvas
from vlmlab.data.world.tasks import IMAGE_PLACEHOLDER, TASK_SPECS, Sample, TaskSpec
from vlmlab.processing.boxes import encode_box

GROUNDING_TASKS = ("ground",)
GROUND_OBJECTS = (2, 4)  # objects per image, inclusive
SIZE_CLASSES = {"small": (0.16, 0.22), "large": (0.32, 0.40)}  # box side / min(width, height)
GROUND_QUESTIONS = ("Where is the {0}?", "Find the {0}.", "Give the box of the {0}.")
_MAX_TRIES = 200


@dataclass(frozen=True)
class FreeTextTaskSpec(TaskSpec):
    """A task whose answers are free text (no closed answer set); ``targets`` only balance the generation."""

    @property
    def answers(self) -> None:
        return None


def phrase(obj: Obj, size_word: str) -> str:
    return f"the {size_word} {obj.colour} {obj.shape}"


def size_class(obj: Obj, scene: Scene) -> str | None:
    """``small`` / ``large`` for a box side within that class's range of the shorter image side, else None."""
    side = min(scene.width, scene.height)
    for word, (low, high) in SIZE_CLASSES.items():
        if math.ceil(low * side) <= obj.size <= math.floor(high * side):
            return word
    return None


def ground_box(obj: Obj) -> tuple[int, int, int, int]:
    """The object's box ``(x1, y1, x2, y2)`` in pixels, exclusive bottom-right (``[x, x + size)``)."""
    return obj.x, obj.y, obj.x + obj.size, obj.y + obj.size


def make_ground(rng: random.Random, shape: str) -> Sample:
    colours = list(COLOURS)
    while True:
        width, height, background = sample_canvas(rng)
        size_word = rng.choice(list(SIZE_CLASSES))
        target_kind = (shape, rng.choice(colours), size_word)
        n = rng.randint(*GROUND_OBJECTS)
        kinds = [target_kind, *(_decoy(rng, target_kind, k == 0) for k in range(n - 1))]
        objects = _place(rng, width, height, kinds)
        if objects is None:
            continue
        scene = Scene(width, height, background, objects)
        target = objects[0]
        text = phrase(target, size_word)
        answer = encode_box(ground_box(target), width, height, ref=text)
        question = rng.choice(GROUND_QUESTIONS).format(text[len("the ") :])
        return Sample("ground", scene, f"{IMAGE_PLACEHOLDER}\n{question}", answer)


def _decoy(rng: random.Random, target: tuple[str, str, str], first: bool) -> tuple[str, str, str]:
    """Another object that the phrase must rule out: the same colour and shape in the other size class (half of
    the first decoys), else one sharing the colour or the shape (never both in the same size class)."""
    shape, colour, size_word = target
    other_size = "large" if size_word == "small" else "small"
    if first and rng.random() < 0.5:
        return shape, colour, other_size
    size = rng.choice(list(SIZE_CLASSES))
    if rng.random() < 0.5:
        return rng.choice([s for s in SHAPES if s != shape]), colour, size
    return shape, rng.choice([c for c in COLOURS if c != colour]), size


def _place(
    rng: random.Random, width: int, height: int, kinds: list[tuple[str, str, str]]
) -> tuple[Obj, ...] | None:
    side = min(width, height)

    def size(kind: tuple[str, str, str]) -> int:
        low, high = SIZE_CLASSES[kind[2]]
        return rng.randint(math.ceil(low * side), math.floor(high * side))

    return place_sized(rng, width, height, kinds, size, max_tries=_MAX_TRIES)


TASK_SPECS["ground"] = FreeTextTaskSpec("ground", SHAPES, make_ground)
