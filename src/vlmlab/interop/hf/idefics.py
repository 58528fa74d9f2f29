"""transformers ``idefics2`` (``Idefics2ForConditionalGeneration``) and ``idefics3``
(``Idefics3ForConditionalGeneration``): an Idefics SigLIP tower (``idefics2_vit`` / ``idefics3_vit``), then
Idefics2's SwiGLU modality projection + perceiver resampler (``idefics2_perceiver``: 64 latents per view) or
Idefics3's pixel shuffle + Linear (``idefics3``), then any causal decoder. References: transformers
``models/idefics2/modeling_idefics2.py``, ``models/idefics3/modeling_idefics3.py``.

transformers' batch is taken as it is: ``pixel_values`` ``[B, N_img, 3, H, W]`` padded with all-zero images and
``pixel_attention_mask`` ``[B, N_img, H, W]`` (``VisionLanguageModel.image_features`` drops the padding views).
"""

from __future__ import annotations

from vlmlab.config import (
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import ConfigError

# transformers writes (and keeps in memory) the same names: ``model.vision_model``, ``model.connector``, ...
KEY_MAP_2 = [
    ("model.vision_model.", "vision.model."),
    ("model.connector.modality_projection.", "connector.modality_projection."),
    ("model.connector.perceiver_resampler.", "connector.perceiver."),
    ("model.text_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
KEY_MAP_3 = [
    ("model.vision_model.", "vision.model."),
    ("model.connector.modality_projection.proj.", "connector.proj."),
    ("model.text_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
IDEFICS_MEAN = IDEFICS_STD = (0.5, 0.5, 0.5)


def _processor(model_type: str, image_size: int, preprocessor: dict | None) -> ProcessorConfig:
    """Image settings and the image splitting (``models/tiling/idefics.py``) of ``preprocessor_config.json``."""
    pre = preprocessor or {}
    if model_type == "idefics2":
        tiler_params = {"split": bool(pre.get("do_image_splitting", False))}
    else:
        longest = (pre.get("size") or {}).get("longest_edge")
        image_size = (pre.get("max_image_size") or {}).get("longest_edge", image_size)
        tiler_params = {"split": bool(pre.get("do_image_splitting", True)), "longest_edge": longest}
    return ProcessorConfig(
        image_size=image_size,
        image_mean=tuple(pre.get("image_mean", IDEFICS_MEAN)),
        image_std=tuple(pre.get("image_std", IDEFICS_STD)),
        tiler=model_type,
        tiler_params=tiler_params,
    )


def _vision(name: str, vc: dict) -> VisionConfig:
    params = architecture_fields(vc)
    image_size = params.pop("image_size")
    if not isinstance(image_size, int) or not isinstance(params.get("patch_size", 32), int):
        raise ConfigError(f"{name}: only square images and patches are supported")
    return VisionConfig(name=name, image_size=image_size, select_layer=-1, params=params)


def _language(tc: dict) -> LanguageConfig:
    return LanguageConfig(model_type=tc.get("model_type", "llama"), params=architecture_fields(tc))


class Format:
    """One Idefics model type (import: ``config_from_hf``; export: ``export_config``)."""

    def __init__(self, model_type: str, tower: str, connector: str, key_map, config_cls: str, arch: str):
        self.model_type, self.tower, self.connector = model_type, tower, connector
        self.KEY_MAP, self.config_cls, self.architecture = key_map, config_cls, arch

    # -- import ---------------------------------------------------------------------------------------------
    def config_from_hf(self, hf: dict, preprocessor: dict | None = None) -> ModelConfig:
        vc, tc = hf.get("vision_config") or {}, hf.get("text_config") or {}
        for sub, d in (("vision_config", vc), ("text_config", tc)):
            if not d:
                raise ConfigError(f"{self.model_type}: config.json has no {sub}")
        vision = _vision(self.tower, vc)
        if self.model_type == "idefics2":
            pc = hf.get("perceiver_config") or {}
            params = {
                "intermediate_size": tc["intermediate_size"],
                "hidden_act": tc.get("hidden_act", "silu"),
                "patch_size": vision.params["patch_size"],
                "n_latents": pc.get("resampler_n_latents", 64),
                "depth": pc.get("resampler_depth", 3),
                "heads": pc.get("resampler_n_heads", 16),
                "dim_head": pc.get("resampler_head_dim", 96),
                "kv_heads": pc.get("num_key_value_heads", 4),
                "resampler_act": pc.get("hidden_act", "silu"),
                "rms_norm_eps": pc.get("rms_norm_eps", 1e-6),
            }
            if pc.get("hidden_size", tc["hidden_size"]) != tc["hidden_size"]:
                raise ConfigError("idefics2: perceiver_config.hidden_size must equal text_config.hidden_size")
        else:
            params = {"scale_factor": hf.get("scale_factor", 2)}
        return ModelConfig(
            vision=vision,
            connector=ConnectorConfig(name=self.connector, params=params),
            language=_language(tc),
            processor=_processor(self.model_type, vision.image_size, preprocessor),
            image_token_id=hf["image_token_id"],
            preset=self.model_type,
        )

    # -- export ---------------------------------------------------------------------------------------------
    def export_config(self, model) -> dict:
        import transformers
        from transformers import AutoConfig

        cfg = model.config
        if cfg.vision.name != self.tower or cfg.connector.name != self.connector:
            raise ConfigError(
                f"format='hf' ({self.model_type}) needs the {self.tower} tower and the {self.connector} "
                f"connector, not {cfg.vision.name!r} + {cfg.connector.name!r}"
            )
        text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
        vision = {"image_size": cfg.vision.image_size, **cfg.vision.params}
        extra: dict = {}
        if self.model_type == "idefics2":
            p = model.connector
            proj, per = p.modality_projection, p.perceiver
            attn = per.layers[0].self_attn if len(per.layers) else None
            if proj.gate_proj.out_features != text.intermediate_size or attn is None:
                raise ConfigError(
                    "format='hf' (idefics2): the modality projection's width must be the decoder's "
                    "intermediate_size (transformers derives it from text_config), with at least one layer"
                )
            act = cfg.connector.params.get("hidden_act", "silu")
            if act != getattr(text, "hidden_act", "silu"):
                raise ConfigError(f"format='hf' (idefics2): hidden_act {act!r} must be the decoder's")
            extra["perceiver_config"] = {
                "hidden_size": text.hidden_size,
                "hidden_act": cfg.connector.params.get("resampler_act", "silu"),
                "rms_norm_eps": per.norm.eps,
                "resampler_n_latents": per.n_latents,
                "resampler_depth": len(per.layers),
                "resampler_n_heads": attn.heads,
                "resampler_head_dim": attn.head_dim,
                "num_key_value_heads": attn.kv_heads,
            }
        else:
            extra["scale_factor"] = model.connector.scale_factor
        hf = getattr(transformers, self.config_cls)(
            vision_config=vision,
            text_config=text,
            image_token_id=cfg.image_token_id,
            tie_word_embeddings=text.tie_word_embeddings,
            **extra,
        )
        d = hf.to_dict()
        d["architectures"] = [self.architecture]
        return d


idefics2 = Format(
    "idefics2",
    "idefics2_vit",
    "idefics2_perceiver",
    KEY_MAP_2,
    "Idefics2Config",
    "Idefics2ForConditionalGeneration",
)
idefics3 = Format(
    "idefics3", "idefics3_vit", "idefics3", KEY_MAP_3, "Idefics3Config", "Idefics3ForConditionalGeneration"
)
# The transformers model type each Idefics connector exports to (``hf_model_type``).
MODEL_TYPES = {"idefics2_perceiver": "idefics2", "idefics3": "idefics3"}
