"""transformers ``mllama`` (``MllamaForConditionalGeneration``, Llama-3.2-Vision) in vlmlab's composition: the
``mllama_vit`` tower (transformers' ``MllamaVisionModel``), the ``linear`` connector (``multi_modal_projector``:
``vision_output_dim`` -> text hidden size, with bias), a plain ``LlamaForCausalLM`` made of the text model's
self-attention layers, and its cross-attention layers as gated ``fusion.cross`` blocks (``models/fusion/cross.py``:
RMSNorm, per-head q/k RMSNorm, GQA, scalar tanh gates, SwiGLU FF, ``empty_rows="zero_ff"``, adjacent images
grouped). Reference: transformers ``models/mllama/modeling_mllama.py`` and ``processing_mllama.py``.

The layer stack. ``MllamaTextModel`` interleaves its layers: those at ``cross_attention_layers`` cross-attend to the
image, the others are Llama layers. vlmlab removes the cross layers from the stack and renumbers the rest; a cross
layer at stack index ``i`` becomes the block in front of self-attention layer ``j = i - (cross layers before i)``
(``import_tensors`` / ``export_tensors``). Two adjacent cross layers, or one that ends the stack, have no such place
and are refused.

The vocabulary. The text model embeds ``vocab_size + 8`` ids (``<|image|>`` = ``vocab_size`` is a text token,
embedded like any other) but its head scores ``vocab_size``. A Llama decoder has one size for both: vlmlab's has
``vocab_size + 8``, the 8 extra head rows zero on import (their logits are 0 where transformers has no column) and
dropped on export.

The masks. transformers' batch is taken as it is (``pixel_values`` ``[B, N_img, T, 3, H, W]``, ``aspect_ratio_ids``,
``aspect_ratio_mask``), but not its ``cross_attention_mask``: vlmlab derives the same mask from ``input_ids``
(``media_mask`` with ``group_consecutive``: ``get_cross_attention_token_mask``'s rule) and the tower's real rows
(an image's tiles up to its tile count, as ``convert_sparse_cross_attention_mask_to_dense`` marks them).
"""

from __future__ import annotations

import re

import torch

from vlmlab.config import (
    ConnectorConfig,
    CrossAttentionConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import ConfigError
from vlmlab.interop.hf.convert import _rename

EXTRA_EMBEDDINGS = 8  # MllamaTextModel's embed_tokens: vocab_size + 8 rows
IMAGE_TOKEN = "<|image|>"
MEAN = STD = (0.5, 0.5, 0.5)  # MllamaImageProcessor's defaults (IMAGENET_STANDARD)

# The on-disk layout transformers writes (5.x keeps 4.x's names in files); export uses it. The cross-attention
# layers are taken out of ``language_model.model.layers`` by ``import_tensors`` (named ``cross_attn.{j}.``).
KEY_MAP = [
    ("vision_model.", "vision.model."),
    ("multi_modal_projector.", "connector.layers.0."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
    ("cross_attn.", "cross_attn."),
]
# transformers 5's in-memory names, accepted on import.
IMPORT_ALIASES = [
    ("model.vision_model.", "vision.model."),
    ("model.multi_modal_projector.", "connector.layers.0."),
    ("model.language_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
# A cross-attention layer's tensors (MllamaCrossAttentionDecoderLayer) -> a vlmlab block's (CrossAttentionBlock).
CROSS_KEYS = [
    ("input_layernorm.", "attn_norm."),
    ("cross_attn.", "attn."),
    ("cross_attn_attn_gate", "attn_gate"),
    ("post_attention_layernorm.", "ff_norm."),
    ("mlp.", "ff."),
    ("cross_attn_mlp_gate", "ff_gate"),
]
LAYER = re.compile(r"^(language_model\.model\.|model\.language_model\.)layers\.(\d+)\.(.+)$")
HEADS = ("language_model.lm_head.weight", "lm_head.weight")
# The block settings of Mllama's cross-attention layers (the rest follow from the decoder: heads, widths, eps).
CROSS = dict(
    kind="gated",
    norm="rmsnorm",
    ff="swiglu",
    qk_norm=True,
    gate="scalar",
    empty_rows="zero_ff",
    group_consecutive=True,
    reset_token_id=-1,
)


def _places(n_layers: int, cross: list[int]) -> list[int]:
    """The self-attention layer (numbered without the cross layers) each cross layer sits in front of."""
    places = []
    for k, i in enumerate(sorted(set(cross))):
        if not 0 <= i < n_layers:
            raise ConfigError(f"mllama: cross_attention_layers: {i} is not a layer of {n_layers}")
        if i + 1 in cross or i == n_layers - 1:
            raise ConfigError(
                f"mllama: cross-attention layer {i} is followed by another cross-attention layer or ends the "
                f"stack (vlmlab places each in front of a self-attention layer)"
            )
        places.append(i - k)
    return places


def _stack(n_self: int, places: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Mllama's stack index of each self-attention layer and of the block in front of each place."""
    self_at, cross_at, i = {}, {}, 0
    for j in range(n_self):
        if j in places:
            cross_at[j], i = i, i + 1
        self_at[j], i = i, i + 1
    return self_at, cross_at


# -- import -------------------------------------------------------------------------------------------------
def _hf(hf: dict):
    """``config.json`` as transformers reads it (its defaults; legacy ``rope_scaling`` + ``rope_theta``)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import MllamaConfig

    for sub in ("vision_config", "text_config"):
        if not hf.get(sub):
            raise ConfigError(f"mllama: config.json has no {sub}")
    try:
        return MllamaConfig.from_dict(hf)
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ConfigError(f"mllama: config.json: {' '.join(str(e).split())}") from None


# Text-config fields with the same name and meaning in Mllama's text config and the Llama decoder's.
SAME_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    cfg = _hf(hf)
    t, v = cfg.text_config, cfg.vision_config
    if not isinstance(v.image_size, int) or not isinstance(v.patch_size, int):
        raise ConfigError("mllama: only square images and patches are supported")
    if t.hidden_act != "silu":
        raise ConfigError(
            f"mllama: text hidden_act {t.hidden_act!r} (the cross-attention FF is SwiGLU with silu)"
        )
    cross = list(t.cross_attention_layers)
    places = _places(t.num_hidden_layers, cross)
    llama = dict(
        vocab_size=t.vocab_size + EXTRA_EMBEDDINGS,
        num_hidden_layers=t.num_hidden_layers - len(places),
        rope_parameters=dict(t.rope_parameters),
        attention_dropout=t.dropout,
        tie_word_embeddings=False,
        **{k: getattr(t, k) for k in SAME_TEXT_FIELDS},
    )
    pre = preprocessor or {}
    size = (pre.get("size") or {}).get("height", v.image_size)
    return ModelConfig(
        vision=VisionConfig(
            name="mllama_vit",
            image_size=v.image_size,
            select_layer=-1,
            params=architecture_fields(v.to_dict(), drop=("image_size",)),
        ),
        connector=ConnectorConfig(name="linear"),
        language=LanguageConfig(model_type="llama", params=llama),
        processor=ProcessorConfig(
            image_size=size,
            image_mean=tuple(pre.get("image_mean", MEAN)),
            image_std=tuple(pre.get("image_std", STD)),
            image_token=IMAGE_TOKEN,
        ),
        image_token_id=cfg.image_token_index,
        fusion=FusionConfig(
            mode=None, cross=CrossAttentionConfig(layers=places, kv_heads=t.num_key_value_heads, **CROSS)
        ),
        preset="mllama",
    )


def import_tensors(tensors: dict[str, torch.Tensor], hf_config: dict) -> dict[str, torch.Tensor]:
    """Cross-attention layers -> ``cross_attn.{j}.`` blocks, self-attention layers renumbered, the head padded to
    the embedding's ``vocab_size + 8`` rows with zeros."""
    t = _hf(hf_config).text_config
    cross = set(t.cross_attention_layers)
    out = {}
    for key, tensor in tensors.items():
        m = LAYER.match(key)
        if m:
            prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
            before = sum(c < i for c in cross)
            if i in cross:
                key = f"cross_attn.{i - before}.{_rename(rest, CROSS_KEYS) or rest}"
            else:
                key = f"{prefix}layers.{i - before}.{rest}"
        elif key in HEADS and tensor.shape[0] == t.vocab_size:
            tensor = torch.cat([tensor, tensor.new_zeros(EXTRA_EMBEDDINGS, tensor.shape[1])])
        out[key] = tensor
    return out


# -- export -------------------------------------------------------------------------------------------------
def _check_exportable(model) -> list[int]:
    """The decoder layers with a block in front (one-line ConfigError when transformers' Mllama cannot hold the
    model)."""
    cfg, lc = model.config, model.language.config
    f = cfg.fusion
    if (
        cfg.vision.name != "mllama_vit"
        or cfg.connector.name != "linear"
        or cfg.language.model_type != "llama"
    ):
        raise ConfigError(
            f"format='hf' (mllama) needs the mllama_vit tower, the linear connector and a llama decoder, not "
            f"{cfg.vision.name!r} + {cfg.connector.name!r} + {cfg.language.model_type!r}"
        )
    if f is None or f.cross is None or f.mode is not None or model.cross_attn is None:
        raise ConfigError(
            "format='hf' (mllama) needs gated cross-attention blocks alone (fusion.cross, no mode)"
        )
    wrong = [f"{k}={getattr(f.cross, k)!r}" for k, v in CROSS.items() if getattr(f.cross, k) != v]
    if wrong:
        raise ConfigError(
            f"format='hf' (mllama): cross-attention settings Mllama does not have: {', '.join(wrong)}"
        )
    head_dim = lc.hidden_size // lc.num_attention_heads
    block = next(iter(model.cross_attn.values()))
    shapes = {
        "heads": (block.attn.heads, lc.num_attention_heads),
        "head_dim": (block.attn.head_dim, head_dim),
        "kv_heads": (block.attn.kv_heads, lc.num_key_value_heads),
        "ff_hidden": (block.ff.gate_proj.out_features, lc.intermediate_size),
        "media_dim": (block.attn.k_proj.in_features, lc.hidden_size),
        "decoder head_dim": (lc.head_dim, head_dim),
        "decoder hidden_act": (lc.hidden_act, "silu"),
        "decoder attention_bias": (lc.attention_bias, False),
        "decoder mlp_bias": (lc.mlp_bias, False),
    }
    wrong = [f"{k}={got!r} (needs {want!r})" for k, (got, want) in shapes.items() if got != want]
    if wrong:
        raise ConfigError(
            f"format='hf' (mllama): settings transformers' Mllama cannot hold: {', '.join(wrong)}"
        )
    return sorted(int(j) for j in model.cross_attn)


def export_config(model) -> dict:
    from transformers import MllamaConfig

    places = _check_exportable(model)
    cfg, lc = model.config, model.language.config
    _, cross_at = _stack(lc.num_hidden_layers, places)
    text = dict(
        vocab_size=lc.vocab_size - EXTRA_EMBEDDINGS,
        num_hidden_layers=lc.num_hidden_layers + len(places),
        rope_parameters=dict(lc.rope_parameters),
        dropout=lc.attention_dropout,
        tie_word_embeddings=False,
        cross_attention_layers=sorted(cross_at.values()),
        **{k: getattr(lc, k) for k in SAME_TEXT_FIELDS},
    )
    vision = {"image_size": cfg.vision.image_size, **cfg.vision.params}
    d = MllamaConfig(vision_config=vision, text_config=text, image_token_index=cfg.image_token_id).to_dict()
    d["architectures"] = ["MllamaForConditionalGeneration"]
    return d


def export_tensors(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The inverse of ``import_tensors`` on transformers' names: blocks back into the stack as cross-attention
    layers, self-attention layers renumbered, the head cut to ``vocab_size`` rows."""
    places = _check_exportable(model)
    lc = model.language.config
    self_at, cross_at = _stack(lc.num_hidden_layers, places)
    inverse = [(dst, src) for src, dst in CROSS_KEYS]
    out = {}
    for key, t in state.items():
        m = LAYER.match(key)
        if m:
            key = f"{m.group(1)}layers.{self_at[int(m.group(2))]}.{m.group(3)}"
        elif key.startswith("cross_attn."):
            j, rest = key[len("cross_attn.") :].split(".", 1)
            key = f"language_model.model.layers.{cross_at[int(j)]}.{_rename(rest, inverse)}"
        elif key in HEADS:
            t = t[: lc.vocab_size - EXTRA_EMBEDDINGS].contiguous()
        out[key] = t
    return out
