"""The world's text (prompts, answers, captions) without rendering images: what the ``tiny`` tokenizer trains on.

Drawn from a fixed seed that no split uses, so it is the same on every machine and leaks no split's scenes.
"""

from __future__ import annotations

import random

from vlmlab.data.world.tasks import TASK_SPECS

CORPUS_SEED = 20_241_127


def corpus(per_target: int = 6) -> list[str]:
    rng = random.Random(CORPUS_SEED)
    texts = []
    for spec in TASK_SPECS.values():
        for target in spec.targets:
            for _ in range(per_target):
                s = spec.make(rng, target)
                texts.append(s.prompt.replace("<image>", "").strip())
                texts.append(s.answer)
    return texts
