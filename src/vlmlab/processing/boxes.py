"""Grounding boxes in text: the one codec the processor, evaluation and the server share.

Qwen-VL writes a box as ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``: integer corner coordinates
normalised to ``0..999`` of the image's width and height, top-left then bottom-right; several ``<box>`` may
follow one ``<ref>``, and a ``<box>`` may appear without a ``<ref>``. ``encode_box`` writes that form from pixel
coordinates, ``parse_boxes`` reads it back into pixel coordinates of a given image, and ``iou`` scores a
predicted box against a reference one (referring expressions count a hit at IoU >= 0.5).

The reference is asymmetric and so is this codec (SYSTEMS.md §5, §23): Qwen-VL's data encodes ``int(x / W *
1000)`` (kept in 0..999) and its evaluation (``eval_mm/evaluate_grounding.py``) decodes ``x / 999 * W``. A round
trip is exact to within one normalised step (``W / 999`` pixels: under 1 px up to 999 px).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENCODE_SCALE = 1000  # pixels -> normalised: int(x / W * 1000) ...
MAX_COORD = 999  # ... kept in 0..999
DECODE_SCALE = 999  # normalised -> pixels: x / 999 * W (Qwen-VL's evaluation)

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
        min(MAX_COORD, max(0, int(v / size * ENCODE_SCALE)))
        for v, size in zip(box, (width, height, width, height))
    )
    text = f"<box>({x1},{y1}),({x2},{y2})</box>"
    return f"<ref>{ref}</ref>{text}" if ref is not None else text


def parse_boxes(text: str, width: float | None = None, height: float | None = None) -> list[Box]:
    """Every well-formed ``<box>`` in ``text``, in order, scaled to pixels of a ``width`` x ``height`` image
    (normalised ``0..999`` coordinates when no size is given). A box takes the phrase of the nearest
    ``<ref>`` before it with no other text but boxes in between. Corners are put in order and clipped to the
    image; malformed tags are left out, never guessed."""
    sx = width / DECODE_SCALE if width else 1.0
    sy = height / DECODE_SCALE if height else 1.0
    ref_ends = [(m.end(), m.group(1).strip()) for m in _REF.finditer(text)]
    boxes: list[Box] = []
    for m in _BOX.finditer(text):
        # The latest <ref> before this box, if only whitespace and other boxes lie between them.
        before = [(end, phrase) for end, phrase in ref_ends if end <= m.start()]
        ref = before[-1][1] if before and _only_boxes(text[before[-1][0] : m.start()]) else None
        x1, y1, x2, y2 = (min(float(g), MAX_COORD) for g in m.groups())
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


def box_hit(prediction: str, reference: str, threshold: float = 0.5) -> bool:
    """Referring-expression accuracy of one answer: the first well-formed box of ``prediction`` has IoU >=
    ``threshold`` with the first box of ``reference`` (both in normalised coordinates: IoU does not change when
    each axis is scaled). A prediction without a well-formed box is a miss."""
    pred, ref = parse_boxes(prediction), parse_boxes(reference)
    if not pred or not ref:
        return False
    p, r = pred[0], ref[0]
    return iou((p.x1, p.y1, p.x2, p.y2), (r.x1, r.y1, r.x2, r.y2)) >= threshold
