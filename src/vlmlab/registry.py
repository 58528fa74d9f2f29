"""Name -> builder registries, one per kind of part (encoders, connectors, language models, presets).

[Contract] Adding a part is one file plus one line: ``CONNECTORS["name"] = Builder``. Looking up an unknown name
raises ``UnknownNameError`` listing the valid names, never a ``KeyError`` from deep inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmlab.errors import VlmlabError


class UnknownNameError(VlmlabError, KeyError):
    """An unknown preset, encoder, connector or language-model name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(dict):
    """A plain ``dict`` from name to builder whose lookups fail with the list of valid names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def __missing__(self, name: str) -> Any:
        valid = ", ".join(sorted(self)) or "(none)"
        raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {valid}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        builder: Callable[..., Any] = self[name]
        return builder(*args, **kwargs)
