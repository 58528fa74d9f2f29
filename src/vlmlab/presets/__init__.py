"""Presets: one plain builder function per system, name -> ``Preset`` (architecture, tokenizer, recipe).

Add one: a function in a file of this folder that returns a ``Preset``, and one line below.
"""

from vlmlab.presets.base import Preset
from vlmlab.presets.llava import llava, llava_1_5, llava_1_5_tiny
from vlmlab.presets.llava_next import (
    llava_next,
    llava_next_interleave,
    llava_next_interleave_tiny,
    llava_next_tiny,
    llava_next_video,
    llava_next_video_tiny,
)
from vlmlab.presets.nano import nano
from vlmlab.presets.tiny import tiny
from vlmlab.registry import Registry

PRESETS = Registry("preset")
PRESETS["tiny"] = tiny
PRESETS["nano"] = nano
PRESETS["llava"] = llava
PRESETS["llava-1.5"] = llava_1_5
PRESETS["llava-1.5-tiny"] = llava_1_5_tiny
PRESETS["llava-next"] = llava_next
PRESETS["llava-next-video"] = llava_next_video
PRESETS["llava-next-interleave"] = llava_next_interleave
PRESETS["llava-next-tiny"] = llava_next_tiny
PRESETS["llava-next-video-tiny"] = llava_next_video_tiny
PRESETS["llava-next-interleave-tiny"] = llava_next_interleave_tiny

__all__ = ["PRESETS", "Preset"]
