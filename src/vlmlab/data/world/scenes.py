"""Scenes of the synthetic world: sampling coloured shapes on a light background, and rendering them with PIL.

A ``Scene`` is a plain value (image size, background, objects with integer boxes), so tasks can compute answers
from coordinates, tests can check them, and splits can be kept disjoint by a canonical signature.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
# Six hues far apart in RGB and all clearly darker/more saturated than the backgrounds below.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (220, 220, 220), "beige": (240, 232, 210)}

MIN_SIDE, MAX_SIDE = 48, 96  # image width and height, each sampled independently
# Object box side as a fraction of min(w, h): large enough to tell a star from a circle at 48 px when alone,
# smaller when several objects must fit without overlapping.
SINGLE_SIZE = (0.28, 0.45)
MULTI_SIZE = (0.18, 0.28)
GAP = 2  # pixels kept free between object boxes, so touching shapes never read as one
STAR_INNER = 0.45  # inner/outer radius of the 5-point star: points stay visible at 9 px
SIGNATURE_STEP = 4  # pixels: positions and sizes are quantised to this step in scene signatures


@dataclass(frozen=True)
class Obj:
    """One filled shape; its box is ``[x, x + size) x [y, y + size)`` in pixels (y grows downwards).

    ``stripes``: None for a solid fill, else ``(direction, band, phase)``: the shape is filled with ``band``-px
    stripes of its colour alternating with the background, ``"horizontal"`` or ``"vertical"``, the first colour
    band starting ``phase`` px before the box (``0 <= phase < 2 * band``)."""

    shape: str
    colour: str
    x: int
    y: int
    size: int
    stripes: tuple[str, int, int] | None = None

    @property
    def cx(self) -> float:
        return self.x + self.size / 2

    @property
    def cy(self) -> float:
        return self.y + self.size / 2


@dataclass(frozen=True)
class Scene:
    """An image to render: size, background name and non-overlapping objects."""

    width: int
    height: int
    background: str
    objects: tuple[Obj, ...]

    def signature(self) -> tuple:
        """A canonical, coarse description: scenes with equal signatures look (nearly) the same.

        Used to keep splits disjoint: quantising positions also rejects near-duplicates, not only exact ones.
        """
        q = SIGNATURE_STEP
        objects = sorted((o.shape, o.colour, o.x // q, o.y // q, o.size // q) for o in self.objects)
        return (self.width, self.height, self.background, tuple(objects))


def sample_canvas(rng: random.Random) -> tuple[int, int, str]:
    """A random image size and background name."""
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE), rng.choice(list(BACKGROUNDS))


def sample_size(rng: random.Random, width: int, height: int, multi: bool) -> int:
    low, high = MULTI_SIZE if multi else SINGLE_SIZE
    side = min(width, height)
    return rng.randint(math.ceil(low * side), math.floor(high * side))


def overlaps(a: Obj, b: Obj, gap: int = GAP) -> bool:
    """True when the boxes of ``a`` and ``b`` are closer than ``gap`` pixels."""
    return not (
        a.x + a.size + gap <= b.x
        or b.x + b.size + gap <= a.x
        or a.y + a.size + gap <= b.y
        or b.y + b.size + gap <= a.y
    )


def place_random(
    rng: random.Random,
    width: int,
    height: int,
    kinds: list[tuple[str, str]],
    *,
    multi: bool,
    max_tries: int = 200,
) -> tuple[Obj, ...] | None:
    """Place objects of the given (shape, colour) kinds at random, without overlap; None if placement failed.

    ``multi`` picks the smaller size range. Rejection sampling: each object retries its position up to
    ``max_tries`` times; the caller then resamples the scene.
    """
    return place_sized(
        rng, width, height, kinds, lambda kind: sample_size(rng, width, height, multi), max_tries=max_tries
    )


def place_sized(
    rng: random.Random,
    width: int,
    height: int,
    kinds: list[tuple],
    size_of: Callable[[tuple], int],
    placed: tuple[Obj, ...] = (),
    max_tries: int = 200,
) -> tuple[Obj, ...] | None:
    """``placed`` plus one object per kind (its first two fields: shape, colour), of ``size_of(kind)`` pixels (drawn
    just before the object is placed), at a random place overlapping none of the others (rejection sampling, up to
    ``max_tries`` positions each); None when one did not fit."""
    out = list(placed)
    for kind in kinds:
        size = size_of(kind)
        for _ in range(max_tries):
            obj = Obj(kind[0], kind[1], rng.randint(0, width - size), rng.randint(0, height - size), size)
            if not any(overlaps(obj, other) for other in out):
                out.append(obj)
                break
        else:
            return None
    return tuple(out)


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image: filled shapes, no anti-aliasing (exact colours at object interiors)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.stripes is None:
            _draw_shape(draw, obj, fill)
            continue
        # Striped: the shape's mask, intersected with the stripes, pastes the colour over the background.
        mask = Image.new("L", (scene.width, scene.height), 0)
        _draw_shape(ImageDraw.Draw(mask), obj, 255)
        stripes = Image.new("L", mask.size, 0)
        direction, band, phase = obj.stripes
        start = obj.y if direction == "horizontal" else obj.x
        for k in range(start - phase, start + obj.size, 2 * band):
            box = (
                (0, k, scene.width, k + band - 1)
                if direction == "horizontal"
                else (k, 0, k + band - 1, scene.height)
            )
            ImageDraw.Draw(stripes).rectangle(box, fill=255)
        image.paste(fill, (0, 0, scene.width, scene.height), ImageChops.multiply(mask, stripes))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    x0, y0, x1, y1 = obj.x, obj.y, obj.x + obj.size - 1, obj.y + obj.size - 1  # PIL boxes are inclusive
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star_points(obj), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; valid shapes: {', '.join(SHAPES)}")


def _star_points(obj: Obj) -> list[tuple[float, float]]:
    """Ten vertices of a 5-point star with one point straight up, centred in the object's box."""
    outer = (obj.size - 1) / 2
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * STAR_INNER
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((obj.cx - 0.5 + radius * math.cos(angle), obj.cy - 0.5 + radius * math.sin(angle)))
    return points
