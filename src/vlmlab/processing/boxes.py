"""Grounding boxes in text: the one codec the processor, evaluation and the server share.

Qwen-VL writes a box as ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``: integer corner coordinates
normalised to ``[0, 1000]`` of the image's width and height, top-left then bottom-right; several ``<box>`` may
follow one ``<ref>``, and a ``<box>`` may appear without a ``<ref>``. ``encode_box`` writes that form from pixel
coordinates, ``parse_boxes`` reads it back into pixel coordinates of a given image, and ``iou`` scores a
predicted box against a reference one (referring expressions count a hit at IoU >= 0.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALE = 1000  # Qwen-VL's normalised coordinate range

_NUM = r"\s*(\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"<box>\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*</box>")
_REF = re.compile(r"<ref>(.*?)</ref>", re.S)


@dataclass(frozen=True)
class Box:
    """A box in pixels of its image: ``(x1, y1)`` top-left, ``(x2, y2)`` bottom-right, ``ref`` the phrase it
    grounds (None when the text gave none), ``span`` its ``<box>`` tag's character range in the text."""

    x1: float
    y1: float
    x2: float
    y2: float
    ref: str | None = None
    span: tuple[int, int] | None = None

    def as_dict(self) -> dict:
        return {"ref": self.ref, "box": [self.x1, self.y1, self.x2, self.y2]}


def encode_box(
    box: tuple[float, float, float, float], width: int, height: int, ref: str | None = None
) -> str:
    """``(x1, y1, x2, y2)`` in pixels of a ``width`` x ``height`` image -> Qwen-VL's text form."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    x1, y1, x2, y2 = (
        min(SCALE, max(0, int(v / size * SCALE))) for v, size in zip(box, (width, height, width, height))
    )
    text = f"<box>({x1},{y1}),({x2},{y2})</box>"
    return f"<ref>{ref}</ref>{text}" if ref is not None else text


def parse_boxes(text: str, width: float | None = None, height: float | None = None) -> list[Box]:
    """Every well-formed ``<box>`` in ``text``, in order, scaled to pixels of a ``width`` x ``height`` image
    (normalised ``[0, 1000]`` coordinates when no size is given). A box takes the phrase of the nearest
    ``<ref>`` before it with no other text but boxes in between. Corners are put in order and clipped to the
    image; malformed tags are left out, never guessed."""
    sx = width / SCALE if width else 1.0
    sy = height / SCALE if height else 1.0
    ref_ends = [(m.end(), m.group(1).strip()) for m in _REF.finditer(text)]
    boxes: list[Box] = []
    for m in _BOX.finditer(text):
        # The latest <ref> before this box, if only whitespace and other boxes lie between them.
        before = [(end, phrase) for end, phrase in ref_ends if end <= m.start()]
        ref = before[-1][1] if before and _only_boxes(text[before[-1][0] : m.start()]) else None
        x1, y1, x2, y2 = (min(float(g), SCALE) for g in m.groups())
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        boxes.append(Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy, ref, m.span()))
    return boxes


def _only_boxes(text: str) -> bool:
    return not _BOX.sub("", text).strip()


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when either is empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
