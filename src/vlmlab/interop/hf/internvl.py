"""transformers ``internvl`` (``InternVLForConditionalGeneration``): InternViT -> pixel shuffle (v2) -> LN-MLP
(``multi_modal_projector``) -> any causal decoder, with InternVL's dynamic tiling (SYSTEMS.md §18). References:
transformers ``models/internvl/modeling_internvl.py``, ``processing_internvl.py`` and
``models/got_ocr2/image_processing_got_ocr2.py`` (``crop_to_patches``).

vlmlab parts: ``internvit`` tower (``vision_feature_layer`` / ``vision_feature_select_strategy``), the
``pixel_shuffle_mlp`` connector (``ratio = 1 / downsample_ratio``), the ``dynamic`` tiler, and each image's
placeholder run ``<IMG_CONTEXT>`` x (256 x tiles) wrapped in ``<img>`` / ``</img>`` (``image_start`` /
``image_end``), as ``InternVLProcessor`` writes it. transformers has no ``ps_version``: its shuffle is v2, so a
``ps_version="v1"`` model (the InternVL 1.5 checkpoints' transposed grid) does not export.
"""

from __future__ import annotations

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import ConfigError

# The on-disk layout transformers writes (5.x keeps 4.x's names in files); export uses it.
KEY_MAP = [
    ("vision_tower.", "vision.model."),
    ("multi_modal_projector.layer_norm.", "connector.layers.0."),
    ("multi_modal_projector.linear_1.", "connector.layers.1."),
    ("multi_modal_projector.linear_2.", "connector.layers.3."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
]
# transformers 5's in-memory names, accepted on import.
IMPORT_ALIASES = [
    ("model.vision_tower.", "vision.model."),
    ("model.multi_modal_projector.layer_norm.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_1.", "connector.layers.1."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.3."),
    ("model.language_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
STRATEGIES = {"default": "patch", "full": "cls_patch"}
# InternVLProcessor's tokens (the checkpoints' tokenizer: start_image_token, end_image_token, context_image_token).
IMAGE_START, IMAGE_END, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def _ratio(downsample_ratio: float) -> int:
    r = round(1 / downsample_ratio) if downsample_ratio > 0 else 0
    if r < 1 or abs(r * downsample_ratio - 1) > 1e-6:
        raise ConfigError(f"internvl: downsample_ratio {downsample_ratio!r} is not 1 / an integer")
    return r


def processor_from_hf(image_size: int, preprocessor: dict | None) -> ProcessorConfig:
    """Image settings from ``preprocessor_config.json`` (``GotOcr2ImageProcessor``); without one, transformers'
    defaults for InternVL (``crop_to_patches`` on, 1 to 12 tiles, CLIP's mean and std)."""
    pre = preprocessor or {}
    size = pre.get("size") or {}
    side = size.get("height", image_size) if isinstance(size, dict) else int(size)
    tiled = pre.get("crop_to_patches", True) and pre.get("max_patches", 12) > 1
    return ProcessorConfig(
        image_size=side,
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
        image_std=tuple(pre.get("image_std", CLIP_STD)),
        resize="squash",
        image_token=IMAGE_CONTEXT,
        tiler="dynamic" if tiled else None,
        tiler_params=(
            {
                "min_tiles": pre.get("min_patches", 1),
                "max_tiles": pre.get("max_patches", 12),
                "thumbnail": True,
            }
            if tiled
            else {}
        ),
        image_start=IMAGE_START,
        image_end=IMAGE_END,
        max_length=4096,
    )


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    vc, tc = hf["vision_config"], hf["text_config"]
    if vc.get("model_type", "internvl_vision") != "internvl_vision":
        raise ConfigError(
            f"internvl: vision tower {vc.get('model_type')!r} is not supported (internvl_vision)"
        )
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ConfigError(f"internvl: vision_feature_layer {layer!r} (several layers) is not supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"internvl: vision_feature_select_strategy {strategy!r} is not one of {list(STRATEGIES)}"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"internvl: projector_hidden_act {hf['projector_hidden_act']!r} is not supported (gelu)"
        )
    vision_params = architecture_fields(vc)
    image_size = vision_params.pop("image_size", 448)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ConfigError(f"internvl: only square tiles are supported, not image_size {list(image_size)}")
        image_size = image_size[0]
    text_params = architecture_fields(tc)
    # transformers ties the LM head from the top-level flag (InternVLConfig defaults to tied).
    text_params["tie_word_embeddings"] = hf.get("tie_word_embeddings", True)
    return ModelConfig(
        vision=VisionConfig(
            name="internvit",
            image_size=image_size,
            select_layer=layer,
            select_feature=STRATEGIES[strategy],
            params=vision_params,
        ),
        connector=ConnectorConfig(
            name="pixel_shuffle_mlp", params={"ratio": _ratio(hf.get("downsample_ratio", 0.5))}
        ),
        language=LanguageConfig(model_type=tc.get("model_type", "qwen2"), params=text_params),
        processor=processor_from_hf(image_size, preprocessor),
        image_token_id=hf["image_token_id"],
        preset="internvl-1.5",
    )


def export_config(model) -> dict:
    """The transformers ``InternVLConfig`` of a vlmlab model (internvit tower, pixel_shuffle_mlp v2 connector)."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    cfg = model.config
    params = cfg.connector.params
    if cfg.vision.name != "internvit" or cfg.connector.name != "pixel_shuffle_mlp":
        raise ConfigError(
            f"format='hf' (internvl) needs the internvit tower and the pixel_shuffle_mlp connector, "
            f"not {cfg.vision.name!r} + {cfg.connector.name!r}"
        )
    if params.get("ps_version", "v2") != "v2":
        raise ConfigError(
            f"format='hf' (internvl): transformers' pixel shuffle is v2, this model's is {params['ps_version']!r}"
        )
    vision = InternVLVisionConfig(image_size=cfg.vision.image_size, **cfg.vision.params)
    text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
    strategy = {v: k for k, v in STRATEGIES.items()}[cfg.vision.select_feature]
    hf = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        downsample_ratio=1 / params.get("ratio", 2),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.vision.select_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    d = hf.to_dict()
    d["architectures"] = ["InternVLForConditionalGeneration"]
    return d
