"""Multi-image prompt layouts (LLaVA-NeXT-Interleave, SYSTEMS.md §13): *interleaved* (each ``<image>`` stays
where the text puts it) and *in-the-front* (every placeholder moved, in order, to the start of the first user
turn, the text otherwise unchanged). Training mixes both (``Stage.front_layout``).

``to_front`` also returns where each placeholder was (its anchors), so ``to_interleaved`` restores the original
exactly. A placeholder's following newline moves with it (``"<image>\\n"`` is LLaVA's convention), so a single
leading image reads the same in both layouts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vlmlab.errors import SampleError

IMAGE = "<image>"


@dataclass(frozen=True)
class Anchor:
    """Where a placeholder stood: message index, character offset in that message's text without placeholders,
    and whether a newline followed it."""

    message: int
    offset: int
    newline: bool


def to_front(messages: list[dict], placeholder: str = IMAGE) -> tuple[list[dict], list[Anchor]]:
    """The in-the-front layout of ``messages`` and the anchors of the placeholders it moved."""
    out, anchors = [dict(m) for m in messages], []
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    for i, m in enumerate(out):
        text = m.get("content")
        if not isinstance(text, str) or placeholder not in text:
            continue
        kept, pos = [], 0
        while (j := text.find(placeholder, pos)) >= 0:
            kept.append(text[pos:j])
            end = j + len(placeholder)
            newline = text.startswith("\n", end)
            anchors.append(Anchor(i, sum(map(len, kept)), newline))
            pos = end + newline
        kept.append(text[pos:])
        m["content"] = "".join(kept)
    if anchors and first_user is not None:
        out[first_user]["content"] = (placeholder + "\n") * len(anchors) + out[first_user]["content"]
    return out, anchors


def to_interleaved(front: list[dict], anchors: list[Anchor], placeholder: str = IMAGE) -> list[dict]:
    """Inverse of ``to_front``: the placeholders put back at their anchors."""
    out = [dict(m) for m in front]
    if anchors:
        first_user = next(i for i, m in enumerate(out) if m.get("role") == "user")
        prefix = (placeholder + "\n") * len(anchors)
        if not out[first_user]["content"].startswith(prefix):
            raise SampleError(
                f"not an in-the-front layout: the first user turn does not start with {len(anchors)} placeholders"
            )
        out[first_user]["content"] = out[first_user]["content"][len(prefix) :]
    # Insert from the last anchor backwards so earlier offsets stay valid.
    for a in reversed(anchors):
        text = out[a.message]["content"]
        out[a.message]["content"] = text[: a.offset] + placeholder + "\n" * a.newline + text[a.offset :]
    return out


def picks_front(record_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a record is shown in the in-the-front layout when a stage mixes ``fraction`` of them: a stable
    hash of the id, so the choice is the same on every epoch, resume and machine."""
    if fraction <= 0:
        return False
    h = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction
