"""transformers ``idefics`` (``IdeficsForVisionText2Text``: Idefics v1, the open reproduction of Flamingo) as
vlmlab's deep-fusion composition. Reference: transformers ``models/idefics/`` (``modeling_idefics.py``,
``vision.py``, ``perceiver.py``, ``processing_idefics.py``).

- Vision tower: ``idefics_vit`` (``models/encoders/idefics1_vit.py``), transformers' ``IdeficsVisionTransformer``;
  its last hidden state, CLS row kept, no post-layernorm (what ``IdeficsModel.forward`` reads).
- Connector: ``perceiver`` with ``project=False`` (``use_resampler``: Flamingo's resampler with a ReLU FF and,
  with ``qk_layer_norms_perceiver``, per-head LayerNorms on queries and keys, at the tower's width), or
  ``identity``.
- Decoder: a plain ``LlamaForCausalLM`` (Idefics' decoder layers are Llama's: RMSNorm, RoPE, SwiGLU, no biases).
  Its decoupled embedding and head (``weight`` + ``additional_embedding`` / ``additional_fc``: the extra tokens
  such as ``<image>`` and ``<fake_token_around_image>``) become one embedding and one head of
  ``vocab_size + additional_vocab_size`` rows; the decoder's config keeps ``additional_vocab_size`` so that
  export splits them back.
- Gated cross-attention: ``fusion.cross`` kind ``gated``, ``placement="idefics"`` (a block in front of each layer
  ``i % cross_layer_interval == 0``; transformers' block ``k`` is vlmlab's ``cross_attn.{k * interval}``),
  RMSNorm, SwiGLU, scalar or vector gates (``alpha_type`` ``float`` / ``vector``), ``qk_norm``
  (``qk_layer_norms``), attention output zeroed for tokens that see no image, K/V read at the connector's width
  (the tower's), and Idefics' end-of-document rule: after an EOS token no image is seen until the next one
  (``reset_token_id``).

[Contract] Inputs: transformers' batch as it is -- ``input_ids``, ``attention_mask`` (left padding is fine) and
``pixel_values`` ``[B, N_img, 3, S, S]`` with each sample's images in order, padded with all-zero images --
except ``image_attention_mask``, which vlmlab does not take: it computes the same mask from ``input_ids`` (a
token sees the latest ``<image>`` up to it, none before the first, none after an EOS until the next image;
generated tokens see what the last prompt token sees). Each image is one ``<image>`` token in the text; the
imported processor settings write ``<fake_token_around_image>`` before and after it, as transformers' processor
does, except that for adjacent images transformers writes one shared separator between them, vlmlab two.

transformers' Idefics ``config.json`` has no image token id (the tokenizer holds it): vlmlab reads
``image_token_index`` from ``config.json`` (its export writes it; transformers keeps the extra field). Not
``image_token_id``: transformers warns about any ``*_token_id`` outside ``vocab_size``, and Idefics' ``<image>`` is
one of the additional tokens after it.
"""

from __future__ import annotations

import json
import re

import torch

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    CrossAttentionConfig,
    FusionConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import CheckpointError, ConfigError

TOWER = "idefics_vit"
FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
ARCHITECTURE = "IdeficsForVisionText2Text"

# Whole-prefix renames. The perceiver's and the gated blocks' tensors are renamed (and the blocks renumbered) by
# ``import_tensors`` / ``export_tensors``, which hand over vlmlab's names.
KEY_MAP = [
    ("model.vision_model.", "vision.model."),
    ("model.", "language.model."),  # embed_tokens (concatenated), layers, norm: Llama's names
    ("lm_head.", "language.lm_head."),
    ("connector.perceiver.", "connector.perceiver."),
    ("cross_attn.", "cross_attn."),
]
# Inside ``model.gated_cross_attn_layers.{k}.`` -> inside ``cross_attn.{k * interval}.`` (specific names first).
GATED_NAMES = [
    ("cross_attn.q_layer_norm.", "attn.q_norm."),
    ("cross_attn.k_layer_norm.", "attn.k_norm."),
    ("cross_attn.", "attn."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ff_norm."),
    ("mlp.", "ff."),
    ("alpha_cross_attn", "attn_gate"),
    ("alpha_dense", "ff_gate"),
]
GATES = ("attn_gate", "ff_gate")
# Inside ``model.perceiver_resampler.blocks.{i}.`` (``0`` attention, ``1`` FF) -> ``connector.perceiver.layers.{i}.``
PERCEIVER_BLOCK_NAMES = [
    ("0.context_layer_norm.", "input_context_norm."),
    ("0.latents_layer_norm.", "input_latents_norm."),
    ("0.q_layer_norm.", "self_attn.q_norm."),
    ("0.k_layer_norm.", "self_attn.k_norm."),
    ("0.output_proj.", "self_attn.o_proj."),
    ("0.", "self_attn."),
    ("1.ln.", "post_attention_layernorm."),
    ("1.fc.", "mlp.fc1."),
    ("1.c_proj.", "mlp.fc2."),
]
PERCEIVER_NAMES = [("latents", "latents"), ("layer_norm.", "norm.")]
DECOUPLED = [
    ("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
    ("lm_head.weight", "lm_head.additional_fc.weight"),
]
HF_GATED = re.compile(r"model\.gated_cross_attn_layers\.(\d+)\.(.+)")
HF_BLOCK = re.compile(r"model\.perceiver_resampler\.blocks\.(\d+)\.(.+)")
HF_PERCEIVER = "model.perceiver_resampler."
OUR_GATED = re.compile(r"cross_attn\.(\d+)\.(.+)")
OUR_BLOCK = re.compile(r"connector\.perceiver\.layers\.(\d+)\.(.+)")
OUR_PERCEIVER = "connector.perceiver."


def _swap(name: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if name.startswith(src):
            return dst + name[len(src) :]
    return None


def _inverse(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(dst, src) for src, dst in pairs]


def _hf_config(hf: dict):
    from transformers import IdeficsConfig

    try:
        return IdeficsConfig.from_dict(hf)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"idefics: config.json: {str(e).splitlines()[0]}") from None


def _eos(c) -> int:
    eos = c.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ConfigError(f"idefics: eos_token_id {list(eos)} must be one id (Idefics' end of document)")
        eos = eos[0]
    if eos is None:
        raise ConfigError("idefics: eos_token_id is not set (Idefics' end of document)")
    return int(eos)


# -- import ---------------------------------------------------------------------------------------------------------
def config_extras(path, hf: dict) -> dict:
    """``image_token_index`` from the tokenizer beside the checkpoint (where transformers keeps the id of
    ``<image>``) when ``config.json`` lacks it: ``tokenizer_config.json``'s added tokens."""
    tok = path / "tokenizer_config.json"
    if "image_token_index" in hf or not tok.is_file():
        return {}
    added = json.loads(tok.read_text()).get("added_tokens_decoder", {})
    ids = [int(i) for i, t in added.items() if t.get("content") == IMAGE_TOKEN]
    return {"image_token_index": ids[0]} if ids else {}


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    c = _hf_config(hf)
    image_token_id = hf.get("image_token_index")
    if image_token_id is None:
        raise ConfigError(
            f"idefics: neither config.json nor tokenizer_config.json gives the id of {IMAGE_TOKEN!r} "
            "(image_token_index)"
        )
    if c.hidden_act != "silu":
        raise ConfigError(
            f"idefics: hidden_act {c.hidden_act!r} is not supported (vlmlab's gated FF is SwiGLU)"
        )
    if c.alpha_type not in ("float", "vector"):
        raise ConfigError(f"idefics: alpha_type {c.alpha_type!r} is not one of ['float', 'vector']")
    if c.num_hidden_layers % c.cross_layer_interval:
        raise ConfigError(
            f"idefics: num_hidden_layers ({c.num_hidden_layers}) must be a multiple of cross_layer_interval "
            f"({c.cross_layer_interval})"
        )
    vc = c.vision_config
    if not isinstance(vc.image_size, int) or not isinstance(vc.patch_size, int):
        raise ConfigError("idefics: only square images and patches are supported")
    eos = _eos(c)
    text = {
        "vocab_size": c.vocab_size + c.additional_vocab_size,
        "additional_vocab_size": c.additional_vocab_size,  # the last rows: transformers' separate tensors
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": dict(c.rope_parameters),
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
    }
    if c.use_resampler:
        p = c.perceiver_config
        connector = ConnectorConfig(
            name="perceiver",
            params={
                "project": False,
                "n_latents": p.resampler_n_latents,
                "depth": p.resampler_depth,
                "heads": p.resampler_n_heads,
                "dim_head": p.resampler_head_dim,
                "ff": "relu",
                "qk_norm": p.qk_layer_norms_perceiver,
            },
        )
    else:
        connector = ConnectorConfig(name="identity")
    cross = CrossAttentionConfig(
        kind="gated",
        every=c.cross_layer_interval,
        placement="idefics",
        norm="rmsnorm",
        ff="swiglu",
        qk_norm=c.qk_layer_norms,
        gate="scalar" if c.alpha_type == "float" else "vector",
        empty_rows="zero_attn",
        media_dim=vc.embed_dim,
        reset_token_id=eos,
    )
    pre = preprocessor or {}
    return ModelConfig(
        vision=VisionConfig(
            name=TOWER,
            image_size=vc.image_size,
            select_layer=-1,
            select_feature="cls_patch",
            params=architecture_fields(vc.to_dict(), drop=("image_size",)),
        ),
        language=LanguageConfig(model_type="llama", params=text),
        connector=connector,
        processor=ProcessorConfig(
            image_size=vc.image_size,
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            image_std=tuple(pre.get("image_std", CLIP_STD)),
            image_start=FAKE_TOKEN,
            image_end=FAKE_TOKEN,
        ),
        image_token_id=int(image_token_id),
        preset="idefics",
        fusion=FusionConfig(mode=None, cross=cross),
    )


def import_tensors(tensors: dict[str, torch.Tensor], hf: dict) -> dict[str, torch.Tensor]:
    """Gated blocks renumbered (``k`` -> ``k * cross_layer_interval``) and renamed, gates flattened to ``[1]`` /
    ``[D]``; the perceiver's tensors renamed; the decoupled embedding and head concatenated."""
    every = _hf_config(hf).cross_layer_interval
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if m := HF_GATED.fullmatch(key):
            name = _swap(m[2], GATED_NAMES)
            new = name and f"cross_attn.{int(m[1]) * every}.{name}"
            if name in GATES:
                t = t.reshape(-1)
        elif m := HF_BLOCK.fullmatch(key):
            name = _swap(m[2], PERCEIVER_BLOCK_NAMES)
            new = name and f"{OUR_PERCEIVER}layers.{m[1]}.{name}"
        elif key.startswith(HF_PERCEIVER):
            name = _swap(key[len(HF_PERCEIVER) :], PERCEIVER_NAMES)
            new = name and OUR_PERCEIVER + name
        else:
            out[key] = t
            continue
        if new is None:
            raise CheckpointError(f"idefics: unexpected tensor {key!r}")
        out[new] = t
    for main, extra in DECOUPLED:
        if main in out and extra in out:
            out[main] = torch.cat([out[main], out.pop(extra)])
    return out


# -- export ---------------------------------------------------------------------------------------------------------
def export_tensors(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The inverse of ``import_tensors``: transformers' names, block numbers and gate shapes, and the embedding and
    head split at ``additional_vocab_size``."""
    cross = _gated_cross(model.config)
    add = model.config.language.params.get("additional_vocab_size", 0)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if m := OUR_GATED.fullmatch(key):
            name = _swap(m[2], _inverse(GATED_NAMES))
            new = name and f"model.gated_cross_attn_layers.{int(m[1]) // cross.every}.{name}"
            if m[2] in GATES and cross.gate == "vector":
                t = t.reshape(1, 1, -1)
        elif m := OUR_BLOCK.fullmatch(key):
            name = _swap(m[2], _inverse(PERCEIVER_BLOCK_NAMES))
            new = name and f"{HF_PERCEIVER}blocks.{m[1]}.{name}"
        elif key.startswith(OUR_PERCEIVER):
            name = _swap(key[len(OUR_PERCEIVER) :], _inverse(PERCEIVER_NAMES))
            new = name and HF_PERCEIVER + name
        else:
            new = key
        if new is None:
            raise CheckpointError(f"idefics: no transformers name for tensor {key!r}")
        out[new] = t
    if add:
        for main, extra in DECOUPLED:
            if main in out:
                w = out.pop(main)
                out[main], out[extra] = w[:-add].contiguous(), w[-add:].contiguous()
    return out


def _gated_cross(cfg: ModelConfig) -> CrossAttentionConfig:
    cross = cfg.fusion.cross if cfg.fusion is not None else None
    if cfg.vision.name != TOWER or cross is None or cross.kind != "gated":
        raise ConfigError(
            f"format='hf' (idefics) needs the {TOWER} tower and gated cross-attention (fusion.cross kind 'gated')"
        )
    return cross


def _perceiver_config(model) -> dict:
    """transformers' ``perceiver_config`` of the connector; what Idefics' resampler cannot express is refused."""
    from vlmlab.models.connectors.mlp import Identity
    from vlmlab.models.connectors.perceiver import FlamingoPerceiver

    c = model.connector
    if isinstance(c, Identity):
        return {"use_resampler": False}
    if not isinstance(c, FlamingoPerceiver) or c.proj is not None:
        raise ConfigError(
            f"format='hf' (idefics) needs the perceiver connector with project=False or the identity "
            f"connector, not {model.config.connector.name!r} {model.config.connector.params}"
        )
    per = c.perceiver
    if not per.layers:
        raise ConfigError("format='hf' (idefics): the perceiver needs at least one layer")
    attn, ff = per.layers[0].self_attn, per.layers[0].mlp
    dim = per.latents.shape[1]
    checks = [
        ("perceiver norm", type(per.norm).__name__, "LayerNorm"),
        ("perceiver eps", getattr(per.norm, "eps", None), 1e-5),
        ("perceiver ff", (type(ff).__name__, type(getattr(ff, "act", None)).__name__), ("GeluFF", "ReLU")),
        ("perceiver ff width", ff.fc1.out_features, 4 * dim),
        ("perceiver kv_heads", attn.kv_heads, attn.heads),
        ("perceiver time/frame embeddings", (per.media_time_embs, per.frame_embs), (None, None)),
    ]
    _refuse(checks)
    return {
        "use_resampler": True,
        "resampler_n_latents": per.n_latents,
        "resampler_depth": len(per.layers),
        "resampler_n_heads": attn.heads,
        "resampler_head_dim": attn.head_dim,
        "qk_layer_norms_perceiver": attn.q_norm is not None,
    }


def _refuse(checks: list[tuple[str, object, object]]) -> None:
    for what, got, want in checks:
        if got != want:
            raise ConfigError(
                f"format='hf' (idefics): {what} is {got!r}, transformers' Idefics needs {want!r}"
            )


def export_config(model) -> dict:
    """The transformers ``IdeficsConfig`` of a vlmlab model (``idefics_vit`` tower, ``perceiver``
    (``project=False``) or ``identity`` connector, Llama decoder, Idefics' gated blocks)."""
    from transformers import AutoConfig, IdeficsConfig

    from vlmlab.models.fusion.cross import cross_layers

    cfg = model.config
    cross = _gated_cross(cfg)
    text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
    add = getattr(text, "additional_vocab_size", 0)
    heads, n_layers = text.num_attention_heads, text.num_hidden_layers
    block = next(iter(model.cross_attn.values()))
    checks = [
        ("language.model_type", text.model_type, "llama"),
        ("num_key_value_heads", text.num_key_value_heads, heads),
        ("head_dim", getattr(text, "head_dim", None) or text.hidden_size // heads, text.hidden_size // heads),
        ("attention_bias / mlp_bias", (text.attention_bias, text.mlp_bias), (False, False)),
        ("hidden_act", text.hidden_act, "silu"),
        ("fusion.mode", cfg.fusion.mode, None),
        ("image_positions", cfg.image_positions, "sequential"),
        (
            "vision.select_layer / select_feature",
            (cfg.vision.select_layer, cfg.vision.select_feature),
            (-1, "cls_patch"),
        ),
        (
            "fusion.cross layers",
            sorted(map(int, model.cross_attn)),
            cross_layers(n_layers, cross.every, "idefics"),
        ),
        ("num_hidden_layers % fusion.cross.every", n_layers % cross.every, 0),
        (
            "fusion.cross heads x head_dim",
            (block.attn.heads, block.attn.head_dim),
            (heads, text.hidden_size // heads),
        ),
        ("fusion.cross kv_heads", block.attn.kv_heads, heads),
        ("fusion.cross.media_dim", block.attn.k_proj.in_features, model.vision.hidden_size),
        ("fusion.cross.norm / ff", (cross.norm, cross.ff), ("rmsnorm", "swiglu")),
        (
            "fusion.cross.ff_hidden",
            getattr(getattr(block.ff, "gate_proj", None), "out_features", None),
            text.intermediate_size,
        ),
        ("fusion.cross.empty_rows", cross.empty_rows, "zero_attn"),
        ("fusion.cross.group_consecutive", cross.group_consecutive, False),
        ("fusion.cross.reset_token_id (Idefics' end of document)", cross.reset_token_id, text.eos_token_id),
    ]
    _refuse(checks)
    hf = IdeficsConfig(
        vocab_size=text.vocab_size - add,
        additional_vocab_size=add,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        hidden_act=text.hidden_act,
        rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        rope_parameters=dict(text.rope_parameters),
        initializer_range=text.initializer_range,
        tie_word_embeddings=text.tie_word_embeddings,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        alpha_type="float" if cross.gate == "scalar" else "vector",
        cross_layer_interval=cross.every,
        qk_layer_norms=cross.qk_norm,
        vision_config={"image_size": cfg.vision.image_size, **cfg.vision.params},
        perceiver_config=(p := _perceiver_config(model)),
        use_resampler=p["use_resampler"],
        image_token_index=cfg.image_token_id,
    )
    d = hf.to_dict()
    d["architectures"] = [ARCHITECTURE]
    return d
