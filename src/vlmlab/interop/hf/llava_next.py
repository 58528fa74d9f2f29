"""transformers ``llava_next``, ``llava_next_video`` and ``llava_onevision``: the LLaVA-1.5 parts (``llava.py``) plus
AnyRes tiling with ``image_newline`` (SYSTEMS.md §11), video frame pooling (§12) and OneVision's ``anyres_max_N``
and untiled multi-image samples. References: transformers ``modeling_llava_next.py``,
``modeling_llava_next_video.py``, ``modeling_llava_onevision.py``.
"""

from __future__ import annotations

import dataclasses

from vlmlab.config import AnyResConfig, ModelConfig, VideoConfig
from vlmlab.errors import ConfigError
from vlmlab.interop.hf import llava

KEY_MAP = [*llava.KEY_MAP, ("image_newline", "image_newline")]
IMPORT_ALIASES = [*llava.IMPORT_ALIASES, ("model.image_newline", "image_newline")]


def _anyres(hf: dict, **extra) -> AnyResConfig:
    return AnyResConfig(grid_pinpoints=[list(p) for p in hf["image_grid_pinpoints"]], **extra)


def _with(config: ModelConfig, preset: str, anyres: AnyResConfig, video: VideoConfig | None, hf: dict):
    # These image processors' ``do_pad`` stacks images of fewer tiles with zero tiles: not a pad to a square.
    processor = dataclasses.replace(config.processor, anyres=anyres, video=video, pad_to_square=False)
    return dataclasses.replace(
        config,
        processor=processor,
        video_token_id=hf.get("video_token_index", -1) if video is not None else -1,
        preset=preset,
    )


def _video_pooling(hf: dict) -> VideoConfig:
    mode = hf.get("spatial_pool_mode", "average")
    if mode not in ("average", "max"):
        raise ConfigError(f"llava_next_video: spatial_pool_mode {mode!r} is not supported (average, max)")
    return VideoConfig(
        pool=mode, stride=hf.get("spatial_pool_stride", 2), pool_position="before", newline="no_token"
    )


def _onevision_anyres(hf: dict) -> AnyResConfig:
    ratio = hf.get("vision_aspect_ratio", "anyres_max_9")
    if not ratio.startswith("anyres_max_"):
        raise ConfigError(f"llava_onevision: vision_aspect_ratio {ratio!r} is not anyres_max_N")
    return _anyres(hf, max_tiles=int(ratio[len("anyres_max_") :]), tile_multi_image=False)


ONEVISION_VIDEO = VideoConfig(pool="bilinear", stride=2, pool_position="after", newline="one_token")


class Format:
    """One transformers model type of the LLaVA-NeXT family (import: ``config_from_hf``; export: ``export_config``)."""

    KEY_MAP = KEY_MAP
    IMPORT_ALIASES = IMPORT_ALIASES

    def __init__(self, model_type: str, config_cls: str, architecture: str):
        self.model_type, self.config_cls, self.architecture = model_type, config_cls, architecture

    def config_from_hf(self, hf: dict, preprocessor: dict | None = None) -> ModelConfig:
        base = llava.config_from_hf(hf, preprocessor)
        if self.model_type == "llava_next":
            return _with(base, "llava-next", _anyres(hf), None, hf)
        if self.model_type == "llava_next_video":
            return _with(base, "llava-next-video", _anyres(hf), _video_pooling(hf), hf)
        return _with(base, "llava-onevision", _onevision_anyres(hf), ONEVISION_VIDEO, hf)

    def export_config(self, model) -> dict:
        import transformers

        cfg = model.config
        tiles, video = cfg.processor.anyres, cfg.processor.video
        if (
            tiles is None
            or not (tiles.unpad and tiles.newline)
            or cfg.processor.image_size != cfg.vision.image_size
        ):
            raise ConfigError(
                f"format='hf' ({self.model_type}) needs AnyRes with unpad and newline, tiles the tower's size"
            )
        extra: dict = {"image_grid_pinpoints": tiles.grid_pinpoints}
        if self.model_type == "llava_next_video":
            if video.pool_position != "before" or video.newline != "no_token" or video.pool == "bilinear":
                raise ConfigError(
                    "format='hf' (llava_next_video) pools average/max before the projector, no newline"
                )
            extra.update(
                video_token_index=cfg.video_token_id,
                spatial_pool_mode=video.pool,
                spatial_pool_stride=video.stride,
            )
        elif self.model_type == "llava_onevision":
            if dataclasses.replace(video, num_frames=8, max_frames=64, token="<video>") != ONEVISION_VIDEO:
                raise ConfigError("format='hf' (llava_onevision) needs OneVision's video pooling")
            extra.update(
                video_token_index=cfg.video_token_id, vision_aspect_ratio=f"anyres_max_{tiles.max_tiles}"
            )
        d = llava.export_config(model, getattr(transformers, self.config_cls), **extra)
        d["architectures"] = [self.architecture]
        return d

    def export_processor(self, model, processor):
        """transformers' ``LlavaNextProcessor`` (AnyRes pinpoints, base view per the processor's resize) making
        vlmlab's ``input_ids`` and ``pixel_values`` for this model. llava_next only: the video and OneVision
        processors need torchvision's video backends, which this environment does not install."""
        if self.model_type != "llava_next":
            return None
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        cfg = model.config.processor
        settings = llava.image_processor_settings(cfg)
        del settings[
            "do_pad"
        ]  # LlavaNext's do_pad stacks images of fewer tiles with zero tiles (its default)
        image_processor = LlavaNextImageProcessorPil(
            **settings, image_grid_pinpoints=[list(p) for p in cfg.anyres.grid_pinpoints]
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=llava.generation_tokenizer(processor.tokenizer),
            **llava.processor_settings(processor, model),
        )


def hf_model_type(config: ModelConfig) -> str:
    """The transformers model type a vlmlab model exports to."""
    from vlmlab.interop.hf.idefics import MODEL_TYPES

    if config.vision.name == "idefics_vit":  # Idefics v1, gated cross-attention (interop/hf/idefics1.py)
        return "idefics"
    if config.vision.name == "fuyu_patches":  # Fuyu, patches straight into the decoder (interop/hf/fuyu.py)
        return "fuyu"
    if config.vision.name == "mllama_vit":  # Llama-3.2-Vision, gated cross-attention (interop/hf/mllama.py)
        return "mllama"
    if config.connector.name in MODEL_TYPES:
        return MODEL_TYPES[config.connector.name]
    if config.connector.name == "qformer":  # BLIP-2 family (interop/hf/blip2.py)
        return "instructblip" if config.connector.params.get("instruction") else "blip-2"
    if config.connector.name == "pixel_shuffle_mlp":  # InternVL (interop/hf/internvl.py)
        return "internvl"
    tiles, video = config.processor.anyres, config.processor.video
    if tiles is None:
        return "llava"
    if tiles.max_tiles is not None or not tiles.tile_multi_image:
        return "llava_onevision"
    return "llava_next_video" if video is not None else "llava_next"


llava_next = Format("llava_next", "LlavaNextConfig", "LlavaNextForConditionalGeneration")
llava_next_video = Format(
    "llava_next_video", "LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration"
)
llava_onevision = Format("llava_onevision", "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration")
