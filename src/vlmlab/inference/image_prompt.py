"""Answers that ask for an image (Mini-Gemini's generation mode, SYSTEMS.md §16): asked to (the user turn ending
with `` <GEN>``), the model writes a text-to-image prompt inside ``<h>...</h>``; the serving code takes it out of
the answer and hands it to an image generator (dvlab-research/MGM ``mgm/serve/cli.py``: SDXL).

Here the generator is any callable ``(prompt) -> anything`` the caller passes (``inference.chat.answer``'s and
``serving.app.create_app``'s ``image_generator``); none is the default, so nothing is generated or downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

ImageGenerator = Callable[[str], Any]
# A complete block: <h>, text with no <h> or </h> in it, </h>.
_BLOCK = re.compile(r"<h>((?:(?!<h>|</h>).)*)</h>", re.DOTALL)


def split_image_prompt(text: str) -> tuple[str, str | None]:
    """``(text without the block, prompt)`` for the last complete ``<h>...</h>`` block (as the reference's
    ``split('</h>')[-2].split('<h>')[-1]``; both stripped); ``(text, None)`` when there is none (absent or
    unclosed)."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return text, None
    last = blocks[-1]
    return (text[: last.start()] + text[last.end() :]).strip(), last.group(1).strip()


def handle_image_prompt(text: str, image_generator: ImageGenerator | None) -> tuple[str, str | None]:
    """:func:`split_image_prompt`, and a non-empty prompt handed to ``image_generator`` (when one is given)."""
    text, prompt = split_image_prompt(text)
    if prompt and image_generator is not None:
        image_generator(prompt)
    return text, prompt
