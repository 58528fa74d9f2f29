"""Qwen-VL's multi-image prompt format (SYSTEMS.md §5): ``Picture k: <img>..</img>`` for the k-th image.

``ProcessorConfig.image_label`` (e.g. ``"Picture {k}: "``) is written before every image placeholder of a
conversation, numbering the images from 1 in order; ``image_start`` / ``image_end`` (``<img>`` / ``</img>``) then
wrap each image's placeholder run, so a prompt reads ``Picture 1: <img>`` + feature rows + ``</img>``.
"""

from __future__ import annotations


def label_images(messages: list[dict], placeholder: str, label: str) -> list[dict]:
    """The messages with ``label.format(k=k)`` inserted before the k-th ``placeholder`` (k = 1, 2, ...)."""
    k, out = 0, []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or placeholder not in content:
            out.append(m)
            continue
        pieces = content.split(placeholder)
        text = pieces[0]
        for piece in pieces[1:]:
            k += 1
            text += label.format(k=k) + placeholder + piece
        out.append({**m, "content": text})
    return out
