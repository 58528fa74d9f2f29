"""vlmlab: build, train, evaluate and serve vision-language models.

    model, processor = vlmlab.build("tiny")         # a preset (vlmlab.PRESETS lists them)
    vlmlab.save(model, processor, "out/")
    model, processor = vlmlab.load("out/")          # a saved model or a training checkpoint
"""

from vlmlab.api import build, load, save
from vlmlab.presets import PRESETS

__version__ = "0.1.0"
__all__ = ["PRESETS", "build", "load", "save"]
