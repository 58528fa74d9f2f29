"""transformers ``llava`` (``LlavaForConditionalGeneration``): LLaVA-1.5 = CLIP/SigLIP tower, ``mlp2x_gelu``
projector, any causal decoder (SYSTEMS.md §4). Reference: transformers ``models/llava/modeling_llava.py``.

The tower returns ``hidden_states[vision_feature_layer]``; ``vision_feature_select_strategy`` "default" drops the
CLS row (vlmlab ``select_feature="patch"``), "full" keeps it (``cls_patch``).
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
    ("multi_modal_projector.linear_1.", "connector.layers.0."),
    ("multi_modal_projector.linear_2.", "connector.layers.2."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
]
# Other layouts accepted on import, tried first: hub checkpoints (CLIPVisionModel's ``vision_model.`` level) and
# transformers 5's in-memory names.
IMPORT_ALIASES = [
    ("vision_tower.vision_model.", "vision.model."),
    ("model.vision_tower.", "vision.model."),
    ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
    ("model.language_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
STRATEGIES = {"default": "patch", "full": "cls_patch"}


def processor_from_hf(image_size: int, preprocessor: dict | None) -> ProcessorConfig:
    """Image settings from ``preprocessor_config.json``: CLIP's shortest-edge resize + centre crop, or a resize to
    ``{"height", "width"}`` without the crop (``squash``); ``do_pad`` is LLaVA-1.5's pad to a square with the mean
    colour (``LlavaImageProcessor``). The inverse of ``image_processor_settings``."""
    if not preprocessor:
        return ProcessorConfig(image_size=image_size, resize="shortest_edge_crop")
    crop = preprocessor.get("crop_size") or {}
    side = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    size = preprocessor.get("size") or {}
    crops = preprocessor.get("do_center_crop", True)
    if not crops and isinstance(size, dict) and "height" in size:
        side = size["height"]
    return ProcessorConfig(
        image_size=side,
        image_mean=tuple(preprocessor.get("image_mean", CLIP_MEAN)),
        image_std=tuple(preprocessor.get("image_std", CLIP_STD)),
        resize="shortest_edge_crop" if crops else "squash",
        pad_to_square=bool(preprocessor.get("do_pad", False)),
    )


def image_processor_settings(cfg: ProcessorConfig) -> dict:
    """transformers image processor settings (CLIP / LLaVA family, PIL backend) that turn an image into the
    tensor vlmlab's ``image_to_tensor`` makes of it: bicubic resize, rescale by 1/255, normalise."""
    side = cfg.image_size
    settings = {
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "do_pad": cfg.pad_to_square,
        "resample": 3,  # PIL bicubic
    }
    if cfg.resize == "shortest_edge_crop":
        return {
            **settings,
            "size": {"shortest_edge": side},
            "crop_size": {"height": side, "width": side},
            "do_center_crop": True,
        }
    if cfg.resize == "squash":
        return {**settings, "size": {"height": side, "width": side}, "do_center_crop": False}
    raise ConfigError(f"format='hf': no transformers image processor resizes like {cfg.resize!r}")


def processor_settings(processor, model) -> dict:
    """``LlavaProcessor``'s (and the NeXT family's) settings for vlmlab's model: the tower's patch size and a
    count of extra rows such that one view gives ``model``'s tokens per view; the placeholder; the tokenizer's
    chat template (what ``AutoProcessor.apply_chat_template`` and serving engines use)."""
    cfg = model.config
    patch = cfg.vision.params["patch_size"]
    strategy = {v: k for k, v in STRATEGIES.items()}[cfg.vision.select_feature]
    per_view = (cfg.vision.image_size // patch) ** 2  # model.num_image_tokens: one view's rows (CLS or not)
    return {
        "patch_size": patch,
        "vision_feature_select_strategy": strategy,
        "num_additional_image_tokens": model.num_image_tokens - per_view + (strategy == "default"),
        "image_token": cfg.processor.image_token,
        "chat_template": getattr(processor.tokenizer, "chat_template", None),
    }


def generation_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that pads on the left and says so in its saved config: vlmlab's generation batches
    are left-padded, and transformers' ``generate`` expects them so."""
    import copy

    out = copy.copy(tokenizer)
    out.padding_side = "left"
    out.init_kwargs = {**tokenizer.init_kwargs, "padding_side": "left"}
    return out


def export_processor(model, processor):
    """transformers' ``LlavaProcessor`` that makes vlmlab's ``input_ids`` and ``pixel_values`` for this model
    (``vlmlab.save(..., format="hf")`` writes it beside the weights)."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    image_processor = LlavaImageProcessorPil(**image_processor_settings(model.config.processor))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=generation_tokenizer(processor.tokenizer),
        **processor_settings(processor, model),
    )


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    vc, tc = hf["vision_config"], hf["text_config"]
    tower = TOWERS.get(vc.get("model_type"))
    if tower is None:
        raise ConfigError(
            f"llava: vision tower {vc.get('model_type')!r} is not supported; supported: {list(TOWERS)}"
        )
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"llava: vision_feature_layer {layer!r} (several layers) is not supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"llava: vision_feature_select_strategy {strategy!r} is not one of {list(STRATEGIES)}"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise ConfigError("llava: only the gelu projector with biases (mlp2x_gelu) is supported")
    vision_params = architecture_fields(vc)
    image_size = vision_params.pop("image_size")
    return ModelConfig(
        vision=VisionConfig(
            name=tower,
            image_size=image_size,
            select_layer=layer,
            select_feature=STRATEGIES[strategy],
            params=vision_params,
        ),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type=tc.get("model_type", "llama"), params=architecture_fields(tc)),
        processor=processor_from_hf(image_size, preprocessor),
        image_token_id=hf["image_token_index"],
        preset="llava-1.5",
    )


def export_config(model, config_cls=None, **extra) -> dict:
    """The transformers ``LlavaConfig`` (or ``config_cls`` with ``extra`` fields) of a vlmlab model (tower
    clip/siglip, connector mlp2x_gelu)."""
    from transformers import AutoConfig, LlavaConfig

    config_cls = config_cls or LlavaConfig
    cfg = model.config
    tower = {v: k for k, v in TOWERS.items()}.get(cfg.vision.name)
    if tower is None or cfg.connector.name != "mlp2x_gelu":
        raise ConfigError(
            f"format='hf' (llava) needs a clip or siglip tower and the mlp2x_gelu connector, "
            f"not {cfg.vision.name!r} + {cfg.connector.name!r}"
        )
    vision = AutoConfig.for_model(tower, image_size=cfg.vision.image_size, **cfg.vision.params)
    text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
    strategy = {v: k for k, v in STRATEGIES.items()}[cfg.vision.select_feature]
    hf = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_index=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=cfg.vision.select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
        **extra,
    )
    d = hf.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    return d
