"""``perceiver-tiny``: Flamingo's Perceiver Resampler (SYSTEMS.md §21) as the connector of a prefix-embedding
model: LLaVA-1.5-tiny's parts (a 3-layer CLIP at 64 px, 64 patch tokens, the world's small Llama) with 16 learned
latents in place of the MLP over every patch, so the LLM reads 16 visual tokens instead of 64.

The perceiver is a connector like any other (``ConnectorConfig(name="perceiver", params=...)``): any preset can
use it. Flamingo's own composition (gated cross-attention into a frozen LLM) is a deep-fusion design and is not
this preset; here the latents are spliced into the token sequence as Idefics2 does with its perceiver.
"""

from __future__ import annotations

import dataclasses

from vlmlab.config import ConnectorConfig
from vlmlab.presets.base import Preset
from vlmlab.presets.llava import llava_1_5_tiny


def perceiver_tiny() -> Preset:
    base = llava_1_5_tiny()
    connector = ConnectorConfig(
        name="perceiver", params={"n_latents": 16, "depth": 2, "heads": 4, "dim_head": 16}
    )
    config = dataclasses.replace(base.config, connector=connector, preset="perceiver-tiny")
    return dataclasses.replace(
        base,
        name="perceiver-tiny",
        config=config,
        description="Flamingo's Perceiver Resampler (16 latents) as the connector, at CPU scale",
    )
