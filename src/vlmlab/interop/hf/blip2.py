"""transformers ``blip-2`` (``Blip2ForConditionalGeneration``) and ``instructblip``
(``InstructBlipForConditionalGeneration``): ViT -> Q-Former -> ``language_projection`` -> a decoder-only LM
(OPT, Llama, ...) fed the projected queries at its ``image_token_index`` positions (SYSTEMS.md §2). References:
transformers ``models/blip_2/modeling_blip_2.py``, ``models/instructblip/modeling_instructblip.py``.

BLIP-2's checkpoint keeps only what stage 2 uses (no Q-Former text side); InstructBLIP's keeps the text side
(the instruction enters the Q-Former). Exporting drops vlmlab's stage-1 heads (and, for ``blip-2``, the text
side), as LAVIS deletes them for stage 2. FlanT5 (encoder-decoder) variants are refused.
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

# Stage-1 heads are vlmlab-only: never exported.
STAGE1 = "connector.heads."


def _qformer_params(qc, instruction: bool) -> dict:
    return {
        "hidden_size": qc.hidden_size,
        "num_layers": qc.num_hidden_layers,
        "num_heads": qc.num_attention_heads,
        "intermediate_size": qc.intermediate_size,
        "cross_attention_frequency": qc.cross_attention_frequency,
        "vocab_size": qc.vocab_size if instruction else 0,
        "max_position_embeddings": qc.max_position_embeddings,
        "hidden_act": qc.hidden_act,
        "layer_norm_eps": qc.layer_norm_eps,
        "pad_token_id": qc.pad_token_id if qc.pad_token_id is not None else 0,
        "instruction": instruction,
        "stage1_heads": False,
    }


class Format:
    """One model type of the BLIP-2 family (import: ``config_from_hf``; export: ``export_config``)."""

    def __init__(self, model_type: str, prefix: str, instruction: bool):
        self.model_type, self.prefix, self.instruction = model_type, prefix, instruction
        self.KEY_MAP = [
            ("vision_model.", "vision.model."),
            ("query_tokens", "connector.query_tokens"),
            *([] if instruction else [("qformer.layernorm.", "connector.qformer.embeddings.layernorm.")]),
            ("qformer.", "connector.qformer."),
            ("language_projection.", "connector.proj."),
            ("language_model.", "language."),
        ]
        # transformers 5's in-memory names, accepted on import.
        self.IMPORT_ALIASES = [
            ("model.language_model.", "language.model."),
            ("lm_head.", "language.lm_head."),
        ]

    def _configs(self):
        import transformers

        p = self.prefix
        return tuple(getattr(transformers, f"{p}{c}Config") for c in ("", "Vision", "QFormer"))

    def config_from_hf(self, hf: dict, preprocessor: dict | None = None) -> ModelConfig:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cfg = self._configs()[0].from_dict(hf)
        tc, vc, qc = cfg.text_config, cfg.vision_config, cfg.qformer_config
        if tc.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or tc.is_encoder_decoder:
            raise ConfigError(
                f"{self.model_type}: language model {tc.model_type!r} is not supported; decoder-only (OPT, Llama...)"
                " only, not encoder-decoder (FlanT5)"
            )
        if not self.instruction and getattr(qc, "use_qformer_text_input", False):
            raise ConfigError(
                f"{self.model_type}: use_qformer_text_input (the retrieval model) is not supported"
            )
        if cfg.image_token_index is None:
            raise ConfigError(
                f"{self.model_type}: image_token_index is not set (vlmlab splices at placeholders)"
            )
        vision_params = architecture_fields(vc.to_dict(), drop=("image_size",))
        processor = ProcessorConfig(
            image_size=vc.image_size,
            image_mean=tuple((preprocessor or {}).get("image_mean", CLIP_MEAN)),
            image_std=tuple((preprocessor or {}).get("image_std", CLIP_STD)),
            qformer_instruction=self.instruction,
        )
        return ModelConfig(
            vision=VisionConfig(
                name="blip_vit",
                image_size=vc.image_size,
                select_layer=-1,
                select_feature="cls_patch",
                params=vision_params,
            ),
            connector=ConnectorConfig(
                name="qformer",
                params={"num_queries": cfg.num_query_tokens, **_qformer_params(qc, self.instruction)},
            ),
            language=LanguageConfig(model_type=tc.model_type, params=architecture_fields(tc.to_dict())),
            processor=processor,
            image_token_id=cfg.image_token_index,
            preset=self.model_type,
        )

    def export_drops(self, key: str) -> bool:
        """Tensors with no place in the transformers checkpoint: stage-1 heads (and BLIP-2's text side)."""
        if key.startswith(STAGE1):
            return True
        if self.instruction:
            return False
        text = (
            ".word_embeddings.",
            ".position_embeddings.",
            ".intermediate.",
            ".output.dense",
            ".output.LayerNorm",
        )
        return key.startswith("connector.qformer.") and any(
            t in key and ".attention." not in key and "crossattention" not in key for t in text
        )

    def export_config(self, model) -> dict:
        from transformers import AutoConfig

        cfg = model.config
        p = cfg.connector.params
        if cfg.vision.name != "blip_vit" or cfg.connector.name != "qformer":
            raise ConfigError(
                f"format='hf' ({self.model_type}) needs the blip_vit tower and the qformer connector, "
                f"not {cfg.vision.name!r} + {cfg.connector.name!r}"
            )
        config_cls, vision_cls, qformer_cls = self._configs()
        conn = model.connector
        layer0 = conn.qformer.encoder.layer[0]
        qformer = qformer_cls(
            hidden_size=conn.proj.in_features,
            num_hidden_layers=len(conn.qformer.encoder.layer),
            num_attention_heads=layer0.attention.heads,
            intermediate_size=layer0.intermediate_query.dense.out_features,
            cross_attention_frequency=p.get("cross_attention_frequency", 2),
            vocab_size=p.get("vocab_size", 30523) or 30523,
            max_position_embeddings=p.get("max_position_embeddings", 512),
            hidden_act=p.get("hidden_act", "gelu"),
            layer_norm_eps=p.get("layer_norm_eps", 1e-12),
            pad_token_id=p.get("pad_token_id", 0),
            encoder_hidden_size=model.vision.hidden_size,
        )
        text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
        hf = config_cls(
            vision_config=vision_cls(image_size=cfg.vision.image_size, **cfg.vision.params),
            qformer_config=qformer,
            text_config=text,
            num_query_tokens=conn.num_queries,
            image_token_index=cfg.image_token_id,
            tie_word_embeddings=text.tie_word_embeddings,
        )
        d = hf.to_dict()
        d["architectures"] = [f"{self.prefix}ForConditionalGeneration"]
        return d


blip_2 = Format("blip-2", "Blip2", instruction=False)
instructblip = Format("instructblip", "InstructBlip", instruction=True)
