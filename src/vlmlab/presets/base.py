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


def pretrained_tokenizer(
    config: ModelConfig,
    specials: tuple[str, ...] = ("<image>",),
    plain: tuple[str, ...] = (),
    template: str | None = None,
) -> Callable[[], object]:
    """How a real-scale preset gets its tokenizer: the decoder's own (from ``language.pretrained``, a local
    directory; never a hub download) with ``specials`` (placeholders, image markers) added as special tokens,
    ``plain`` ones (e.g. grounding tags, which answers contain and decoding must keep) as ordinary added tokens,
    and ``template`` (a ``CHAT_TEMPLATES`` name) as its chat template (``None``: the tokenizer's own)."""

    def make():
        from transformers import AutoTokenizer

        from vlmlab.errors import ConfigError
        from vlmlab.models.language import resolve_pretrained
        from vlmlab.processing.templates import CHAT_TEMPLATES

        if not config.language.pretrained:
            raise ConfigError(
                f"preset {config.preset!r}: set language.pretrained to a local decoder directory "
                "(its tokenizer and weights); no hub downloads here"
            )
        tok = AutoTokenizer.from_pretrained(resolve_pretrained(config.language.pretrained))
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
        if plain:
            tok.add_tokens(list(plain))
        if template is not None:
            tok.chat_template = CHAT_TEMPLATES[template]
        return tok

    return make
