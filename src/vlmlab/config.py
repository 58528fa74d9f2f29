"""Typed, nested configuration of a vision-language model: one small dataclass per component.

A ``ModelConfig`` is everything needed to rebuild a model's architecture (without weights); it is written as
``config.json`` into every checkpoint, and ``ModelConfig.from_dict`` is its exact inverse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmlab.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """A vision tower chosen by name from ``vlmlab.models.encoders.ENCODERS``."""

    name: str
    """Registry name: ``clip``, ``siglip``, ``convnet``, ``efficientnet-lite0``."""
    image_size: int = 224
    """Side of the square image the tower sees, in pixels."""
    select_layer: int = -2
    """Which hidden state to return (``hidden_states[select_layer]``); LLaVA uses the penultimate layer."""
    select_feature: str = "patch"
    """``patch`` drops the CLS token, ``cls_patch`` keeps it (towers without CLS ignore this)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Architecture numbers passed to the tower's builder (e.g. a transformers vision config's fields)."""
    pretrained: str | None = None
    """Where real weights come from (a directory, or a name the tower knows); ``None`` = random init."""
    image_mean: tuple[float, float, float] | None = None
    """The normalisation this tower expects, when it differs from the processor's (a tower of
    ``ModelConfig.extra_vision``: its view is re-normalised); None = the processor's."""
    image_std: tuple[float, float, float] | None = None


@dataclass
class ConnectorConfig:
    """A connector chosen by name from ``vlmlab.models.connectors.CONNECTORS``."""

    name: str = "mlp2x_gelu"
    params: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments (``in_dim`` / ``out_dim`` are filled in from the tower and the LM)."""


@dataclass
class LanguageConfig:
    """Any transformers causal decoder (Llama, Qwen2, Mistral, SmolLM2...)."""

    model_type: str = "llama"
    """transformers ``model_type`` used to rebuild the architecture from ``params``."""
    params: dict[str, Any] = field(default_factory=dict)
    """The transformers config's fields (``hidden_size``, ``num_hidden_layers``, ``vocab_size`` ...)."""
    pretrained: str | None = None
    """Where real weights come from (a transformers directory, or a name the loader knows)."""


@dataclass
class AnyResConfig:
    """LLaVA-NeXT AnyRes (SYSTEMS.md §11): a base view plus the tiles of the best-fitting grid resolution."""

    grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    )
    """Candidate resolutions ``[height, width]`` in pixels, multiples of the tower's image size."""
    unpad: bool = True
    """Drop the feature rows/columns that come from the padding (``spatial_unpad``)."""
    newline: bool = True
    """Append the learned ``image_newline`` vector after every feature row (and after a single view)."""
    max_tiles: int | None = None
    """OneVision's ``anyres_max_N``: tile features larger than 1.1x the area of N tiles are bilinearly shrunk."""
    tile_multi_image: bool = True
    """False (OneVision): when a sample has several images, each is one padded square view, not tiled."""


@dataclass
class VideoConfig:
    """Videos as frame sequences (LLaVA-NeXT-Video, SYSTEMS.md §12): frames are sampled, encoded as images and
    their token grids pooled."""

    num_frames: int = 8
    """Frames sampled uniformly over the whole video."""
    max_frames: int = 64
    """A request for more frames than this is refused (memory and context length)."""
    pool: str = "average"
    """2D pooling of each frame's token grid: ``average`` / ``max`` (stride x stride), ``bilinear`` (OneVision:
    resize to ceil(n / stride))."""
    stride: int = 2
    pool_position: str = "before"
    """Pool the tower's features ``before`` the projector (transformers) or ``after`` it (the LLaVA-NeXT repo)."""
    newline: str = "no_token"
    """``image_newline`` positions: ``no_token``, ``grid`` (after each row of each frame), ``frame`` (after each
    frame), ``one_token`` (once after the whole video)."""
    token: str = "<video>"
    """Placeholder written in prompts; expanded to one token per pooled feature row."""
    as_images: bool = False
    """LLaVA-NeXT-Interleave: a video is its frames as an interleaved image list (each ``<video>`` becomes one
    ``<image>`` per frame, encoded like any image); pooling and newline settings are then unused."""


@dataclass
class ProcessorConfig:
    """How images and conversations become tensors; shared by training, evaluation and serving."""

    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = False
    """LLaVA-1.5 ``expand2square``: pad to a square with the mean colour before resizing."""
    resize: str = "squash"
    """``squash``: resize to ``image_size`` squared (aspect not kept); ``shortest_edge_crop``: CLIP's resize of the
    shorter side to ``image_size`` then a centre crop (transformers' ``CLIPImageProcessor``, bit for bit)."""
    image_token: str = "<image>"
    """Placeholder written in prompts; expanded to one token per visual feature row."""
    max_length: int = 2048
    """Longest tokenised sample; longer ones are truncated (never through an image) or rejected."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels than this (read from the header, before decoding) are rejected."""
    anyres: AnyResConfig | None = None
    """High-resolution tiling (LLaVA-NeXT); ``None``: one view per image."""
    video: VideoConfig | None = None
    """Video input settings; ``None``: the model takes no videos."""
    tiler: str | None = None
    """A tiler from ``vlmlab.models.tiling.TILERS`` (e.g. InternVL's ``dynamic``): each image becomes several
    ``image_size`` views, encoded one by one, whose feature rows follow each other. ``None``: one view (or AnyRes)."""
    tiler_params: dict[str, Any] = field(default_factory=dict)
    """Arguments of the tiler (e.g. ``min_tiles``, ``max_tiles``, ``thumbnail``)."""
    image_start: str | None = None
    """Text token written before each image's placeholder run (Qwen-VL's and InternVL's ``<img>``)."""
    image_end: str | None = None
    """Text token written after it (``</img>``)."""
    qformer_instruction: bool = False
    """InstructBLIP: the user's text (image placeholders removed) also goes to the Q-Former, tokenized by the
    Q-Former's tokenizer, as ``qformer_input_ids`` / ``qformer_attention_mask`` (one row per image)."""
    qformer_max_length: int = 128
    """Longest instruction the Q-Former reads (longer ones are cut)."""
    cross_image_size: int | None = None
    """CogAgent: each image is also given, squashed to this side, as ``cross_pixel_values`` for the high-resolution
    tower of ``fusion.cross`` (None: not produced)."""
    image_label: str | None = None
    """Text written before the k-th image of a conversation (Qwen-VL's ``"Picture {k}: "``, k from 1)."""


@dataclass
class CrossAttentionConfig:
    """Cross-attention from the decoder to visual features, hooked into the pretrained decoder (SYSTEMS.md §9, §21;
    ``models/fusion/cross.py``)."""

    kind: str = "gated"
    """``gated``: Flamingo/Idefics/Mllama tanh-gated blocks (gates 0 at init) in front of some layers, attending to
    the connector's output; each ``<image>`` is one text token and a token sees the most recent image.
    ``parallel``: CogAgent's ungated cross-attention after the self-attention of layers, to a second (high-resolution)
    tower's features, seen by every token."""
    every: int = 4
    """One block every ``every`` layers (``placement`` says which); ignored when ``layers`` is set."""
    placement: str = "idefics"
    """``idefics`` (``i % every == 0``), ``openflamingo`` (``(i + 1) % every == 0``) or ``every`` (all layers)."""
    layers: list[int] | None = None
    """Explicit decoder layer indices (a block in front of / inside each)."""
    heads: int | None = None
    """Attention heads (None: the LLM's)."""
    head_dim: int | None = None
    """Per-head width (None: the LLM's hidden size / heads). CogAgent: 32 heads of 32 = a 1024-wide inner space."""
    kv_heads: int | None = None
    norm: str = "rmsnorm"
    """``rmsnorm`` (Idefics, Mllama, CogAgent on Llama) or ``layernorm`` (OpenFlamingo)."""
    ff: str | None = "swiglu"
    """The gated block's FF: ``swiglu`` (Idefics, Mllama), ``gelu`` (OpenFlamingo, x4) or None."""
    ff_hidden: int | None = None
    """FF width (None: the LLM's ``intermediate_size`` for swiglu, 4x hidden for gelu)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head (Mllama)."""
    gate: str = "scalar"
    """Gate shape: ``scalar`` ([1]) or ``vector`` ([D], Idefics' ``alpha_type="vector"``)."""
    empty_rows: str = "zero_attn"
    """Tokens that see no image: attention output zeroed (``zero_attn``), or Mllama's rule (``zero_ff``)."""
    media_dim: int | None = None
    """Width of the features the blocks read (``gated``: the connector's output, None = the LLM's hidden size;
    ``parallel``: the cross tower's width, filled in)."""
    group_consecutive: bool = False
    """Mllama: adjacent ``<image>`` tokens form one group seen together."""
    reset_token_id: int = -1
    """Idefics' end of document: tokens after it see no image until the next one (-1: none)."""
    vision: VisionConfig | None = None
    """``parallel``: the second tower (CogAgent's high-resolution encoder), fed ``cross_pixel_values`` at
    ``processor.cross_image_size``."""


@dataclass
class RegionalConfig:
    """Cambrian-1's re-aggregation inside the decoder (SYSTEMS.md §20; ``models/fusion/sva.py``): after each listed
    decoder layer, the hidden states at the image positions of the connector's queries re-read their own regions of
    every tower (one more aggregation layer of the connector's kind at the LLM's width, with its residual). Needs a
    connector with regions (``sva``) and one view per image."""

    layers: list[int] = field(default_factory=list)
    """Decoder layer indices whose output is re-aggregated (Cambrian-1-8B: start 0, stride 3, 10 layers:
    0, 3, ..., 27)."""


@dataclass
class FusionConfig:
    """Deep fusion inside the decoder (SYSTEMS.md §0, §8, §9, §14, §20, §21): modality-routed linear layers, where
    image rows (the image placeholder positions) go through their own weights and text rows through the LLM's,
    cross-attention to visual features, and/or the image rows re-reading the towers (``regional``)."""

    mode: str | None = "expert"
    """``expert``: CogVLM's visual expert (a copy of each projection for image rows); ``plora``: XComposer2's
    partial LoRA (a low-rank delta on image rows, B at zero); None: no routed layers."""
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """The decoder's Linear layers (by attribute name) that are routed."""
    rank: int = 256
    alpha: float = 256.0
    cross: CrossAttentionConfig | None = None
    """Cross-attention blocks (Flamingo's gated ones, CogAgent's high-resolution branch)."""
    regional: RegionalConfig | None = None
    """Cambrian-1's regional re-aggregation of the image rows inside the decoder."""


@dataclass
class ModelConfig:
    vision: VisionConfig
    language: LanguageConfig
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    image_token_id: int = -1
    """Token id of the image placeholder in the tokenizer (set when the model is built with its tokenizer)."""
    video_token_id: int = -1
    """Token id of the video placeholder (models with ``processor.video``)."""
    preset: str | None = None
    """The preset this config came from (informational)."""
    image_positions: str = "sequential"
    """RoPE positions of image tokens: ``sequential`` (one each, LLaVA) or ``shared`` (CogVLM: every token of one
    image takes the position of its first, and the text after it continues from there)."""
    extra_vision: list[VisionConfig] = field(default_factory=list)
    """More towers on the same image (Mini-Gemini, Cambrian-1; ``models/encoders/multi.py``): each reads the
    processor's view resized to its own ``image_size``."""
    fusion: FusionConfig | None = None
    """Deep fusion inside the decoder: routed layers (CogVLM, XComposer2) and/or cross-attention (Flamingo,
    CogAgent); ``None``: the decoder is the LLM as it is."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, d, "config")


# Fields of a saved transformers config that describe the file, not the architecture.
NON_ARCH_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "quantization_config",
)


def architecture_fields(d: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A transformers config dict as plain ``params``: file metadata (and ``drop``) removed."""
    return {k: v for k, v in d.items() if k not in NON_ARCH_KEYS and k not in drop}


def from_dict(cls: type, d: Any, where: str) -> Any:
    """Build a (nested) dataclass from a plain dict, naming the offending field on bad input."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        sub = _DATACLASS_FIELDS.get((cls, name))
        if sub is not None:
            value = from_dict(sub, value, f"{where}.{name}")
        elif value is not None and (cls, name) in _OPTIONAL_DATACLASS_FIELDS:
            value = from_dict(_OPTIONAL_DATACLASS_FIELDS[(cls, name)], value, f"{where}.{name}")
        elif (cls, name) in _LIST_DATACLASS_FIELDS:
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{name}: expected a list, got {type(value).__name__}")
            sub = _LIST_DATACLASS_FIELDS[(cls, name)]
            value = [from_dict(sub, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, list) and name in ("image_mean", "image_std"):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


_DATACLASS_FIELDS = {
    (ModelConfig, "vision"): VisionConfig,
    (ModelConfig, "language"): LanguageConfig,
    (ModelConfig, "connector"): ConnectorConfig,
    (ModelConfig, "processor"): ProcessorConfig,
}
# Fields that hold a dataclass or None.
_OPTIONAL_DATACLASS_FIELDS = {
    (ProcessorConfig, "anyres"): AnyResConfig,
    (ProcessorConfig, "video"): VideoConfig,
    (ModelConfig, "fusion"): FusionConfig,
    (FusionConfig, "cross"): CrossAttentionConfig,
    (FusionConfig, "regional"): RegionalConfig,
    (CrossAttentionConfig, "vision"): VisionConfig,
}
# Fields that hold a list of dataclasses.
_LIST_DATACLASS_FIELDS = {(ModelConfig, "extra_vision"): VisionConfig}
