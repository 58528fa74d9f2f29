"""Presets: one plain builder function per system, name -> ``Preset`` (architecture, tokenizer, recipe).

Add one: a function in a file of this folder that returns a ``Preset``, and one line below.
"""

from vlmlab.presets.base import Preset
from vlmlab.presets.blip2 import blip2, blip2_tiny, instructblip, instructblip_tiny, xcomposer, xcomposer_tiny
from vlmlab.presets.cambrian import cambrian, cambrian_tiny
from vlmlab.presets.fusion import (
    cogagent,
    cogagent_tiny,
    cogvlm,
    cogvlm_tiny,
    flamingo,
    flamingo_tiny,
    mllama,
    mllama_tiny,
    xcomposer2,
    xcomposer2_tiny,
)
from vlmlab.presets.fuyu import fuyu, fuyu_tiny
from vlmlab.presets.internvl import internvl_1_5, internvl_1_5_tiny, vila_1_5, vila_1_5_tiny
from vlmlab.presets.llava import llava, llava_1_5, llava_1_5_tiny
from vlmlab.presets.llava_next import (
    llava_next,
    llava_next_interleave,
    llava_next_interleave_tiny,
    llava_next_tiny,
    llava_next_video,
    llava_next_video_tiny,
)
from vlmlab.presets.mini_gemini import mini_gemini, mini_gemini_hd, mini_gemini_tiny
from vlmlab.presets.nano import nano
from vlmlab.presets.perceiver import perceiver_tiny
from vlmlab.presets.qwen_vl import minicpm_v, minicpm_v_tiny, qwen_vl, qwen_vl_tiny
from vlmlab.presets.tiny import tiny
from vlmlab.presets.xcomposer2_4khd import xcomposer2_4khd, xcomposer2_4khd_tiny
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
PRESETS["qwen-vl"] = qwen_vl
PRESETS["qwen-vl-tiny"] = qwen_vl_tiny
PRESETS["minicpm-v"] = minicpm_v
PRESETS["minicpm-v-tiny"] = minicpm_v_tiny
PRESETS["blip2"] = blip2
PRESETS["blip2-tiny"] = blip2_tiny
PRESETS["instructblip"] = instructblip
PRESETS["instructblip-tiny"] = instructblip_tiny
PRESETS["xcomposer"] = xcomposer
PRESETS["xcomposer-tiny"] = xcomposer_tiny
PRESETS["internvl-1.5"] = internvl_1_5
PRESETS["internvl-1.5-tiny"] = internvl_1_5_tiny
PRESETS["vila-1.5"] = vila_1_5
PRESETS["vila-1.5-tiny"] = vila_1_5_tiny
PRESETS["perceiver-tiny"] = perceiver_tiny
PRESETS["cogvlm"] = cogvlm
PRESETS["cogvlm-tiny"] = cogvlm_tiny
PRESETS["cogagent"] = cogagent
PRESETS["cogagent-tiny"] = cogagent_tiny
PRESETS["xcomposer2"] = xcomposer2
PRESETS["xcomposer2-tiny"] = xcomposer2_tiny
PRESETS["xcomposer2-4khd"] = xcomposer2_4khd
PRESETS["xcomposer2-4khd-tiny"] = xcomposer2_4khd_tiny
PRESETS["flamingo"] = flamingo
PRESETS["flamingo-tiny"] = flamingo_tiny
PRESETS["mllama"] = mllama
PRESETS["mllama-tiny"] = mllama_tiny
PRESETS["cambrian"] = cambrian
PRESETS["cambrian-tiny"] = cambrian_tiny
PRESETS["fuyu"] = fuyu
PRESETS["fuyu-tiny"] = fuyu_tiny
PRESETS["mini-gemini"] = mini_gemini
PRESETS["mini-gemini-hd"] = mini_gemini_hd
PRESETS["mini-gemini-tiny"] = mini_gemini_tiny

__all__ = ["PRESETS", "Preset"]
