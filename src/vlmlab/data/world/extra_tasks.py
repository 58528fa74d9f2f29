"""Opt-in tasks of the synthetic world, beyond one small image and one question (``build_world(extra_tasks=...)``):

- ``detail``: which way the fine stripes on a small disc in a large image run: legible in AnyRes tiles, not at 32 px;
- ``video``: a clip of a shape moving left, right, up or down: needs the frames in their order;
- ``multi``: two or three images, "do they show the same color/shape?": needs every image.

Each generator receives the answer to produce, as in ``tasks.py``, so answers are balanced by the caller. The
reasoning behind each design (what keeps the answer from being read off less than the intended input) is in the
generator's docstring, and ``tests/test_world.py`` checks it.
"""

from __future__ import annotations

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
DETAIL_ANSWERS = ("horizontal", "vertical")
DETAIL_BAND = 2  # stripe width in pixels: 1 px at 64 px, half a pixel at 32 px
DETAIL_DISC = (28, 44)  # disc diameter in pixels: 7-11 px at 32 px, where the stripes are gone
DETAIL_QUESTIONS = (
    "Which way do the stripes on the small disc run?",
    "Are the stripes on the tiny disc horizontal or vertical?",
)
# --- video -----------------------------------------------------------------------------------------------------
DIRECTIONS = ("left", "right", "up", "down")
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards
VIDEO_SIDE = 80  # pixels, square so that no axis has more room to move along; even (yuv420p)
VIDEO_FRAMES = 8
VIDEO_STEP = 4  # pixels per frame: 28 px over the clip (make_video explains the trade-off)
VIDEO_SIZE = (12, 16)  # object box side in pixels
VIDEO_QUESTIONS = ("Which direction does the {0} {1} move?", "In which direction is the {0} {1} moving?")

# --- multi -----------------------------------------------------------------------------------------------------
YES_NO = ("yes", "no")
MULTI_IMAGES = (2, 3)
MULTI_ATTRIBUTES = ("color", "shape")  # question words; the Obj fields are "colour" and "shape"
MULTI_QUESTIONS = {2: "Do the two images show the same {0}?", 3: "Do all three images show the same {0}?"}


def make_detail(rng: random.Random, direction: str) -> Sample:
    """A ``DETAIL_SIDE`` px square image with one disc filled with ``DETAIL_BAND``-px stripes of a colour and the
    background; the answer is the stripes' direction.

    Why stripes: downscaling averages fine stripes into an even tint, so 4x smaller (one 32 px view) the two
    directions give the same blob, while 2x smaller (the pixels of 2 x 2 AnyRes tiles of 32 px) the stripes are
    still 1 px lines. (At exactly 4x, bicubic resampling averages each 4-px period away whatever its phase.) A
    round outline leaves no other trace of the direction: a square patch of stripes starting and ending with a
    colour band has a blurred profile that differs between its two axes, and a small CNN learnt to read that at
    32 px. Measured with a small CNN (4 conv layers, global max-pooling) trained on 3,000 images and tested on
    600 others, six epochs: from a 64 px copy 100% from the first epoch on; from a 32 px copy 50-50.3% (chance)
    in every epoch. (3-px bands alias into patterns still legible at 32 px: 98% there.)

    Why this size: the disc is not tiny, the stripes are the detail. With 12-20 px discs (about one of
    ``llava-next-tiny``'s ~90 visual tokens) the tiny VLM stayed near its answer prior for 600 steps (60%);
    at 28-44 px it learns the task. An earlier design asked for the shape of a 5-8 px object: partly legible at
    32 px (86% for the CNN after 20 epochs), slow to learn at 64 px, and neither tiny VLM design learnt it.
    """
    background, colour = rng.choice(list(BACKGROUNDS)), rng.choice(list(COLOURS))
    size = rng.randint(*DETAIL_DISC)
    x, y = rng.randint(0, DETAIL_SIDE - size), rng.randint(0, DETAIL_SIDE - size)
    # Colour bands on a 2-band grid of the image (rows/columns 0-1, 4-5, ... or 2-3, 6-7, ...): halving the image
    # then maps each band to one 1-px line; off that grid, halving averages a band with its gap into flat grey.
    start = y if direction == "horizontal" else x
    stripes = (direction, DETAIL_BAND, (start - rng.choice((0, DETAIL_BAND))) % (2 * DETAIL_BAND))
    scene = Scene(DETAIL_SIDE, DETAIL_SIDE, background, (Obj("circle", colour, x, y, size, stripes),))
    return Sample("detail", scene, f"{IMAGE_PLACEHOLDER}\n{rng.choice(DETAIL_QUESTIONS)}", direction)


def make_video(rng: random.Random, direction: str) -> Sample:
    """A clip of ``VIDEO_FRAMES`` frames in which one shape moves ``VIDEO_STEP`` px per frame in ``direction``,
    sometimes beside a static shape of another colour and shape; the question names the moving one.

    Why the answer needs the frames in order: the lowest coordinate the mover reaches along its axis is drawn
    uniformly, independently of the sign, so a "left" clip is exactly a "right" clip played backwards, with the
    same probability. A model that sees the frames as an unordered set can tell the axis (horizontal or vertical)
    but never the sign: it is at chance between left and right, and between up and down. One frame alone says
    little either: the middle of the clip is placed independently of the direction, and the first (or last)
    frame rules a direction out only within one path length (28 px) of an edge. Exactly (every placement
    counted): an ideal observer of the first frame alone names the direction 42.9% of the time (25% is chance),
    one that sees every frame but not their order 50%; a model above both reads the motion. The step trades the
    two: 2 px (14 px paths) left those observers at 31.6% and 50%, but the tiny video model's loss stayed at the
    answer prior for 1500 steps (motion of 11 px at 64 px, under one 16-px token); at 4 px it learns the task.
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


TASK_SPECS["detail"] = TaskSpec("detail", DETAIL_ANSWERS, make_detail)
TASK_SPECS["video"] = TaskSpec("video", DIRECTIONS, make_video)
TASK_SPECS["multi"] = TaskSpec("multi", YES_NO, make_multi)
