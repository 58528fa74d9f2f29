"""What the fusion hooks share: the per-decoder state they read from an attribute (no closures, so a
``copy.deepcopy`` of a fused model runs its own copy), and the span of sequence positions a forward covers."""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.errors import ConfigError


def hooked_state(decoder: nn.Module, attr: str, how: str):
    """The state object stored as ``(state, ...)`` in ``decoder.<attr>``; a one-line error naming ``how`` to
    install it when absent."""
    state = getattr(decoder, attr, None)
    if state is None:
        raise ConfigError(f"{type(decoder).__name__} has no such fusion: call {how} first")
    return state[0]


def forward_span(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int]:
    """A decoder forward's input (``input_ids`` or ``inputs_embeds``) and how many tokens its KV cache already
    holds: the forward covers sequence positions ``offset .. offset + x.shape[1] - 1``."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs["inputs_embeds"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return x, int(cache.get_seq_length()) if cache is not None else 0
