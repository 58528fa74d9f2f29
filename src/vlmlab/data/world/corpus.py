"""The world's text (prompts, answers, captions) without rendering images: what the ``tiny`` tokenizer trains on.

Drawn from a fixed seed that no split uses, so it is the same on every machine and leaks no split's scenes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from vlmlab.data.world.extra_tasks import VIDEO_PLACEHOLDER
from vlmlab.data.world.tasks import CAPTION, IMAGE_PLACEHOLDER, TASK_SPECS, TASKS

CORPUS_SEED = 20_241_127
# The default build's tasks, in registry order. The extra tasks (``EXTRA_TASKS``) are left out by default so that
# the ``tiny`` tokenizer, and every model and demo result trained with it, stays what it was before they existed.
DEFAULT_CORPUS_TASKS = (*TASKS, CAPTION)


def corpus(per_target: int = 6, tasks: Sequence[str] = DEFAULT_CORPUS_TASKS) -> list[str]:
    """``per_target`` prompts (placeholders removed) and answers for every target of every task in ``tasks``."""
    rng = random.Random(CORPUS_SEED)
    texts = []
    for name in tasks:
        spec = TASK_SPECS[name]
        for target in spec.targets:
            for _ in range(per_target):
                s = spec.make(rng, target)
                prompt = s.prompt.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
                texts.append(prompt.strip())
                texts.append(s.answer)
    return texts
