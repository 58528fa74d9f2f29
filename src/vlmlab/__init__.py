"""vlmlab: build, train, evaluate and serve vision-language models.

    model, processor = vlmlab.build("tiny")         # a preset (vlmlab.PRESETS lists them)
    vlmlab.save(model, processor, "out/")
    model, processor = vlmlab.load("out/")          # a saved model or a training checkpoint
    model = vlmlab.from_pretrained("llava-hf-dir/")  # a transformers checkpoint (llava), as vlmlab parts
    model.save_pretrained("export/", format="hf")    # back to transformers' own class

The top-level names are imported lazily so that ``import vlmlab.io`` (and the CLI's start) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_LAZY = {
    "build": "vlmlab.api",
    "from_pretrained": "vlmlab.api",
    "load": "vlmlab.api",
    "save": "vlmlab.api",
    "PRESETS": "vlmlab.presets",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmlab' has no attribute {name!r}")
