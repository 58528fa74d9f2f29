"""transformers ``fuyu`` (``FuyuForCausalLM``): no image encoder, each image patch flattened channels-last and
projected by ``vision_embed_tokens`` into a causal decoder (Persimmon-8B for Fuyu-8B; SYSTEMS.md §7). References:
transformers ``models/fuyu/modeling_fuyu.py``, ``image_processing_fuyu.py``, ``processing_fuyu.py``.

vlmlab parts: the weightless ``fuyu_patches`` tower (one ``p x p`` view per patch), the ``linear`` connector
(``vision_embed_tokens``), the decoder as its own transformers causal LM (``text_config``: ``persimmon``, or any
other model type), and the ``fuyu`` tiler: resize only above the preprocessor's ``size``, pad with
``padding_value``, patches row-major, ``|SPEAKER|`` per patch and ``|NEWLINE|`` after each row, as
``FuyuProcessor`` writes it.

transformers' batch holds the patches flattened, ``image_patches`` / ``pixel_values`` ``[N_patches, p * p * 3]``;
``batch_from_hf`` turns them into vlmlab's ``pixel_values`` ``[N_patches, 3, p, p]`` (``input_ids`` and
``attention_mask`` are used as they are). Prompt wording (``<s>`` after the image, ``<0x04>`` before the answer)
belongs to the tokenizer's chat template, as for every vlmlab model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmlab.config import (
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import ConfigError
from vlmlab.models.encoders.fuyu import views_from_patches
from vlmlab.models.tiling.fuyu import NEWLINE

# The on-disk layout transformers writes (5.x keeps 4.x's names in files, as adept/fuyu-8b has them).
KEY_MAP = [
    ("vision_embed_tokens.", "connector.layers.0."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
]
# transformers 5's in-memory names, accepted on import.
IMPORT_ALIASES = [
    ("model.vision_embed_tokens.", "connector.layers.0."),
    ("model.language_model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
# FuyuProcessor's image placeholder (its tokenizer's id is config.json's image_token_id).
IMAGE_TOKEN = "|SPEAKER|"
TOWER, CONNECTOR, TILER = "fuyu_patches", "linear", "fuyu"
# FuyuImageProcessor's defaults (a checkpoint without preprocessor_config.json).
MAX_SIZE = {"height": 1080, "width": 1920}
MEAN = STD = 0.5
_IMAGE_TOKEN_KEY = "vlmlab_image_token"  # config_extras' entry: the placeholder's text in the tokenizer


def config_extras(path: Path, hf: dict) -> dict:
    """The image placeholder's text: the added token whose id is ``image_token_id`` in the tokenizer beside the
    checkpoint (``tokenizer.json``'s ``added_tokens``, or ``tokenizer_config.json``'s ``added_tokens_decoder``): a
    model trained with another placeholder, e.g. vlmlab's ``<image>``; else ``|SPEAKER|``."""
    tid = hf.get("image_token_id")
    fast, slow = Path(path) / "tokenizer.json", Path(path) / "tokenizer_config.json"
    added = {}
    if slow.is_file():
        added = {
            int(i): t.get("content")
            for i, t in json.loads(slow.read_text()).get("added_tokens_decoder", {}).items()
        }
    if fast.is_file():
        added.update(
            {t["id"]: t.get("content") for t in json.loads(fast.read_text()).get("added_tokens", [])}
        )
    return {_IMAGE_TOKEN_KEY: added[tid]} if added.get(tid) else {}


def _scalar_or_triple(value, name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ConfigError(f"fuyu: preprocessor {name} {value!r} is not a number or 3 numbers")
    return tuple(float(v) for v in values)


def processor_from_hf(patch: int, preprocessor: dict | None, image_token: str) -> ProcessorConfig:
    """``FuyuImageProcessor``'s settings (``preprocessor_config.json``; its defaults without one) as the ``fuyu``
    tiler's: the largest size kept as it is, the padding level, the normalisation."""
    pre = preprocessor or {}
    for key, want in (("do_pad", True), ("do_rescale", True), ("padding_mode", "constant"), ("resample", 2)):
        if pre.get(key, want) != want:
            raise ConfigError(f"fuyu: preprocessor {key}={pre[key]!r} is not supported (only {want!r})")
    if abs(pre.get("rescale_factor", 1 / 255) * 255 - 1) > 1e-6:
        raise ConfigError(f"fuyu: preprocessor rescale_factor {pre['rescale_factor']!r} is not 1/255")
    ps = pre.get("patch_size") or {"height": patch, "width": patch}
    if (ps.get("height"), ps.get("width")) != (patch, patch):
        raise ConfigError(f"fuyu: preprocessor patch_size {ps} is not config.json's patch_size {patch}")
    size = pre.get("size") or MAX_SIZE
    resize = pre.get("do_resize", True)
    normalize = pre.get("do_normalize", True)
    pad = pre.get("padding_value", 1.0)
    if pad != int(pad) or not 0 <= pad <= 255:
        raise ConfigError(f"fuyu: preprocessor padding_value {pad!r} is not an 8-bit level")
    return ProcessorConfig(
        image_size=patch,
        image_mean=_scalar_or_triple(pre.get("image_mean", MEAN), "image_mean") if normalize else (0.0,) * 3,
        image_std=_scalar_or_triple(pre.get("image_std", STD), "image_std") if normalize else (1.0,) * 3,
        resize="squash",  # views are already p x p: left as they are
        image_token=image_token,
        tiler=TILER,
        tiler_params={
            "max_height": size["height"] if resize else None,
            "max_width": size["width"] if resize else None,
            "newline": NEWLINE,
            "pad_value": int(pad),
        },
        max_length=16384,
    )


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    from transformers import FuyuConfig

    image_token = hf.get(_IMAGE_TOKEN_KEY, IMAGE_TOKEN)
    c = FuyuConfig.from_dict({k: v for k, v in hf.items() if k != _IMAGE_TOKEN_KEY})
    if c.num_channels != 3:
        raise ConfigError(f"fuyu: num_channels {c.num_channels} is not supported (RGB only)")
    if not isinstance(c.patch_size, int):
        raise ConfigError(f"fuyu: patch_size {c.patch_size!r} is not one integer (square patches)")
    text = c.text_config.to_dict()
    # FuyuForCausalLM ties its head by the top-level flag, not text_config's.
    params = {**architecture_fields(text), "tie_word_embeddings": c.tie_word_embeddings}
    return ModelConfig(
        vision=VisionConfig(name=TOWER, image_size=c.patch_size),
        connector=ConnectorConfig(name=CONNECTOR),
        language=LanguageConfig(model_type=text["model_type"], params=params),
        processor=processor_from_hf(c.patch_size, preprocessor, image_token),
        image_token_id=c.image_token_id,
        preset="fuyu",
    )


def export_config(model) -> dict:
    """The transformers ``FuyuConfig`` of a vlmlab model (``fuyu_patches`` tower, ``linear`` connector, ``fuyu``
    tiler)."""
    from transformers import AutoConfig, FuyuConfig

    cfg = model.config
    if cfg.vision.name != TOWER or cfg.connector.name != CONNECTOR or cfg.processor.tiler != TILER:
        raise ConfigError(
            f"format='hf' (fuyu) needs the {TOWER} tower, the {CONNECTOR} connector and the {TILER} tiler, not "
            f"{cfg.vision.name!r} + {cfg.connector.name!r} + {cfg.processor.tiler!r}"
        )
    text = AutoConfig.for_model(cfg.language.model_type, **cfg.language.params)
    hf = FuyuConfig(
        text_config=text,
        patch_size=cfg.vision.image_size,
        num_channels=3,
        image_token_id=cfg.image_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    d = hf.to_dict()
    d["architectures"] = ["FuyuForCausalLM"]
    return d


def batch_from_hf(batch: dict, patch: int) -> dict[str, torch.Tensor]:
    """A ``FuyuProcessor`` batch as vlmlab model inputs: the flattened patches (``image_patches``, or
    ``pixel_values`` with ``return_legacy_image_output=False``) as ``pixel_values`` ``[N, 3, p, p]``."""
    out = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    patches = batch.get("image_patches", batch.get("pixel_values"))
    if patches is not None:
        out["pixel_values"] = views_from_patches(torch.as_tensor(patches), patch)
    return out
