"""What a preset is: a model configuration, how to get its tokenizer, and its paper's staged training recipe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vlmlab.config import ModelConfig
from vlmlab.training.stages import Stage


@dataclass
class Preset:
    name: str
    config: ModelConfig
    make_tokenizer: Callable[[], object]
    """Returns a transformers tokenizer that has the image placeholder token and a chat template."""
    recipe: list[Stage] = field(default_factory=list)
    """The training stages, in order (``vlmlab train`` runs them)."""
    description: str = ""
