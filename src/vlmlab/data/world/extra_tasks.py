"""Opt-in tasks of the synthetic world, beyond one small image and one question (``build_world(extra_tasks=...)``):

- ``detail``: one tiny shape in a large image: quickly learnt from high-resolution input (AnyRes tiles), not at 32 px;
- ``video``: a clip of a shape moving left, right, up or down: needs the frames in their order;
- ``multi``: two or three images, "do they show the same color/shape?": needs every image.

Each generator receives the answer to produce, as in ``tasks.py``, so answers are balanced by the caller. The
reasoning behind each design (what keeps the answer from being read off less than the intended input) is in the
generator's docstring, and ``tests/test_world.py`` checks it.
"""

from __future__ import annotations

import math
import random

from vlmlab.data.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    overlaps,
    sample_canvas,
    sample_size,
)
from vlmlab.data.world.tasks import IMAGE_PLACEHOLDER, TASK_SPECS, Sample, TaskSpec

EXTRA_TASKS = ("detail", "video", "multi")
VIDEO_PLACEHOLDER = "<video>"  # LLaVA-NeXT-Video convention, paired with the record's "video" like "<image>"

# --- detail ----------------------------------------------------------------------------------------------------
DETAIL_SIDE = 128  # square: a 32 px input shrinks it 4x, 2 x 2 tiles of 32 px (64 px in all) 2x
DETAIL_SHAPES = ("circle", "square", "triangle")  # no star: see make_detail
# The object's area, given as the side of the square of equal area: 5-7.7 px here, 1.3-1.9 px at 32 px and
# 2.5-3.9 px at 64 px. Every shape gets the same area range, so the amount of colour never gives it away.
DETAIL_AREA_SIDE = (5.0, 7.7)
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / box area, as rendered
DETAIL_QUESTIONS = ("What shape is the small object?", "Which shape is the tiny object?")

# --- video -----------------------------------------------------------------------------------------------------
DIRECTIONS = ("left", "right", "up", "down")
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards
VIDEO_SIDE = 80  # pixels, square so that no axis has more room to move along; even (yuv420p)
VIDEO_FRAMES = 8
VIDEO_STEP = 2  # pixels per frame: 14 px over the clip (make_video explains the trade-off)
VIDEO_SIZE = (12, 16)  # object box side in pixels
VIDEO_QUESTIONS = ("Which direction does the {0} {1} move?", "In which direction is the {0} {1} moving?")

# --- multi -----------------------------------------------------------------------------------------------------
YES_NO = ("yes", "no")
MULTI_IMAGES = (2, 3)
MULTI_ATTRIBUTES = ("color", "shape")  # question words; the Obj fields are "colour" and "shape"
MULTI_QUESTIONS = {2: "Do the two images show the same {0}?", 3: "Do all three images show the same {0}?"}


def make_detail(rng: random.Random, shape: str) -> Sample:
    """A ``DETAIL_SIDE`` px square image with one tiny shape at a random place; the answer is its shape.

    Why the shape, and why so small: colour survives downscaling (a tiny dot averages into a tinted pixel whose
    hue is still there), and so does the amount of colour, so the shape is the attribute and every shape covers
    the same range of areas; what separates the shapes at 32 px is then only how the colour spreads over one or
    two pixels. Measured with a small CNN (5 conv layers, global max-pooling, so it may look anywhere) trained
    on 3,000 images and tested on 900 others, 8 epochs: 98% of shapes named from a 64 px copy (the pixels of
    2 x 2 tiles of 32 px), 34% from a 32 px copy, where chance is 33%. The shape is attenuated at 32 px, not
    erased: trained for 20 epochs the 32 px CNN reached 86%, so "near chance at low resolution" holds for short
    training budgets like the demo's. Larger shapes stay legible at 32 px (99.6% for 2-4 px shapes there), and
    grain noise on the image (std 16 levels) lowered the 20-epoch 32 px result only to 70%, so the image stays
    clean. The star is left out: its spikes spread the same area over a box 1.7x wider, and that spread alone
    survives 32 px (97% of stars named there).
    """
    background, colour = rng.choice(list(BACKGROUNDS)), rng.choice(list(COLOURS))
    size = round(rng.uniform(*DETAIL_AREA_SIDE) / math.sqrt(_FILL[shape]))
    x, y = rng.randint(0, DETAIL_SIDE - size), rng.randint(0, DETAIL_SIDE - size)
    scene = Scene(DETAIL_SIDE, DETAIL_SIDE, background, (Obj(shape, colour, x, y, size),))
    return Sample("detail", scene, f"{IMAGE_PLACEHOLDER}\n{rng.choice(DETAIL_QUESTIONS)}", shape)


def make_video(rng: random.Random, direction: str) -> Sample:
    """A clip of ``VIDEO_FRAMES`` frames in which one shape moves ``VIDEO_STEP`` px per frame in ``direction``,
    sometimes beside a static shape of another colour and shape; the question names the moving one.

    Why the answer needs the frames in order: the lowest coordinate the mover reaches along its axis is drawn
    uniformly, independently of the sign, so a "left" clip is exactly a "right" clip played backwards, with the
    same probability. A model that sees the frames as an unordered set can tell the axis (horizontal or vertical)
    but never the sign: it is at chance between left and right, and between up and down. One frame alone says
    little either: the middle of the clip is placed independently of the direction, and the first (or last)
    frame rules a direction out only within one path length (14 px) of an edge, so an ideal observer of the
    first frame alone names the sign about 63% of the time (50% is chance). A longer path (a larger
    ``VIDEO_STEP``) is easier to see at 64 px but widens those edge zones, so the step is kept small.
    """
    dx, dy = _STEPS[direction]
    span = VIDEO_STEP * (VIDEO_FRAMES - 1)
    colour, static_colour = rng.sample(list(COLOURS), 2)
    shape, static_shape = rng.sample(SHAPES, 2)
    background = rng.choice(list(BACKGROUNDS))
    while True:  # the static shape rarely fails to fit beside the path; a fresh path then retries
        size = rng.randint(*VIDEO_SIZE)
        low = rng.randint(0, VIDEO_SIDE - size - span)  # lowest along-axis coordinate of the path
        across = rng.randint(0, VIDEO_SIDE - size)
        start = low + span if dx + dy < 0 else low  # moving towards smaller coordinates starts at the far end
        x0, y0 = (start, across) if dx else (across, start)
        path = [
            Obj(shape, colour, x0 + dx * VIDEO_STEP * t, y0 + dy * VIDEO_STEP * t, size)
            for t in range(VIDEO_FRAMES)
        ]
        statics = _static_beside(rng, path, static_shape, static_colour) if rng.random() < 0.5 else ()
        if statics is not None:
            break
    frames = tuple(Scene(VIDEO_SIDE, VIDEO_SIDE, background, (obj, *statics)) for obj in path)
    question = rng.choice(VIDEO_QUESTIONS).format(colour, shape)
    return Sample("video", frames[0], f"{VIDEO_PLACEHOLDER}\n{question}", direction, frames[1:], video=True)


def motion_of(frames: tuple[Scene, ...]) -> str | None:
    """The direction the first object of ``frames`` moves from the first frame to the last, or None if unclear."""
    first, last = frames[0].objects[0], frames[-1].objects[0]
    dx, dy = last.x - first.x, last.y - first.y
    if dx and not dy:
        return "left" if dx < 0 else "right"
    if dy and not dx:
        return "up" if dy < 0 else "down"
    return None


def _static_beside(rng: random.Random, path: list[Obj], shape: str, colour: str) -> tuple[Obj] | None:
    """One static object clear of every position of the moving one, or None when none fitted in 100 tries."""
    for _ in range(100):
        size = rng.randint(*VIDEO_SIZE)
        obj = Obj(shape, colour, rng.randint(0, VIDEO_SIDE - size), rng.randint(0, VIDEO_SIDE - size), size)
        if not any(overlaps(obj, moving) for moving in path):
            return (obj,)
    return None


def make_multi(rng: random.Random, answer: str) -> Sample:
    """Two or three images of one shape each; the question asks whether they all show the same color (or shape).

    Why every image is needed: the asked attribute of each image is uniform over its values whatever the answer
    ("yes": one value drawn for all; "no": a uniformly drawn tuple that is not constant, whose every entry is
    uniform by symmetry), so any one image on its own leaves the answer at chance; the answer is a relation
    between the images. The other attribute is drawn independently per image, so it never hints.
    """
    n = rng.choice(MULTI_IMAGES)
    attribute = rng.choice(MULTI_ATTRIBUTES)
    values = list(COLOURS) if attribute == "color" else list(SHAPES)
    if answer == "yes":
        asked = [rng.choice(values)] * n
    else:
        asked = [rng.choice(values) for _ in range(n)]
        while len(set(asked)) == 1:
            asked = [rng.choice(values) for _ in range(n)]
    scenes = []
    for value in asked:
        if attribute == "color":
            scenes.append(_one_object(rng, rng.choice(SHAPES), value))
        else:
            scenes.append(_one_object(rng, value, rng.choice(list(COLOURS))))
    prompt = "\n".join([IMAGE_PLACEHOLDER] * n + [MULTI_QUESTIONS[n].format(attribute)])
    return Sample("multi", scenes[0], prompt, answer, tuple(scenes[1:]))


def _one_object(rng: random.Random, shape: str, colour: str) -> Scene:
    """A scene of one object of the ``colour``/``shape`` tasks' size range at a random place."""
    width, height, background = sample_canvas(rng)
    size = sample_size(rng, width, height, multi=False)
    obj = Obj(shape, colour, rng.randint(0, width - size), rng.randint(0, height - size), size)
    return Scene(width, height, background, (obj,))


TASK_SPECS["detail"] = TaskSpec("detail", DETAIL_SHAPES, make_detail)
TASK_SPECS["video"] = TaskSpec("video", DIRECTIONS, make_video)
TASK_SPECS["multi"] = TaskSpec("multi", YES_NO, make_multi)
