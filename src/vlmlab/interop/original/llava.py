"""The original LLaVA repository's checkpoint layout (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``, model type
``llava_llama``): a Llama checkpoint plus ``model.mm_projector.*`` and the ``mm_*`` config fields (SYSTEMS.md §3,
§4). The vision tower is usually not saved (it was frozen): it is read from ``mm_vision_tower``, which must be a
local CLIP/SigLIP directory here (no hub access). Images are marked by one ``IMAGE_TOKEN_INDEX = -200`` id per
image in the original code; vlmlab uses that id as its placeholder, expanded to the image's token count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from vlmlab.config import (
    CLIP_MEAN,
    CLIP_STD,
    AnyResConfig,
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VisionConfig,
    architecture_fields,
)
from vlmlab.errors import CheckpointError, ConfigError

IMAGE_TOKEN_INDEX = -200
PROJECTORS = {"linear": "linear", "mlp2x_gelu": "mlp2x_gelu"}
# mm_projector: Linear (index 0), then GELU, Linear (index 2) for mlp2x_gelu; a bare Linear for ``linear``.
KEY_MAP = [
    ("model.mm_projector.0.", "connector.layers.0."),
    ("model.mm_projector.2.", "connector.layers.2."),
    ("model.mm_projector.", "connector.layers.0."),
    ("model.image_newline", "image_newline"),
    ("model.vision_tower.vision_tower.vision_model.", "vision.model."),
    ("model.vision_tower.vision_tower.", "vision.model."),
    ("model.", "language.model."),
    ("lm_head.", "language.lm_head."),
]
_MM_KEYS = ("mm_", "image_aspect_ratio", "tune_mm", "freeze_mm", "image_grid", "use_mm_proj", "unfreeze_mm")


def _tower_dir(hf: dict) -> Path:
    tower = hf.get("mm_vision_tower") or hf.get("vision_tower")
    if not tower or not Path(tower).is_dir():
        raise CheckpointError(
            f"llava (original layout): mm_vision_tower {tower!r} is not a local directory; "
            "point it at a saved CLIP/SigLIP vision model (no hub downloads here)"
        )
    return Path(tower)


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ModelConfig:
    projector = hf.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        raise ConfigError(
            f"llava (original layout): mm_projector_type {projector!r} is not one of {list(PROJECTORS)}"
        )
    tower_dir = _tower_dir(hf)
    tower_cfg = json.loads((tower_dir / "config.json").read_text())
    tower_cfg = tower_cfg.get("vision_config", tower_cfg)  # a full CLIPModel directory nests it
    name = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip"}.get(
        tower_cfg["model_type"]
    )
    if name is None:
        raise ConfigError(
            f"llava (original layout): vision tower type {tower_cfg['model_type']!r} is not supported"
        )
    vision_params = architecture_fields(tower_cfg)
    image_size = vision_params.pop("image_size")
    lm_params = {k: v for k, v in architecture_fields(hf).items() if not k.startswith(_MM_KEYS)}
    aspect = hf.get("image_aspect_ratio")
    pad = aspect == "pad"
    anyres = None
    if aspect == "anyres":
        merge = hf.get("mm_patch_merge_type", "flat")
        if merge not in ("spatial_unpad", "spatial"):
            raise ConfigError(
                f"llava (original layout): mm_patch_merge_type {merge!r} with anyres is not supported"
            )
        pinpoints = hf["image_grid_pinpoints"]
        if isinstance(pinpoints, str):  # some configs store the Python literal
            import ast

            pinpoints = ast.literal_eval(pinpoints)
        unpad = merge == "spatial_unpad"
        anyres = AnyResConfig(grid_pinpoints=[[h, w] for w, h in pinpoints], unpad=unpad, newline=unpad)
    return ModelConfig(
        vision=VisionConfig(
            name=name,
            image_size=image_size,
            select_layer=hf.get("mm_vision_select_layer", -2),
            select_feature=hf.get("mm_vision_select_feature", "patch"),
            params=vision_params,
        ),
        connector=ConnectorConfig(name=PROJECTORS[projector]),
        language=LanguageConfig(model_type="llama", params=lm_params),
        processor=ProcessorConfig(
            image_size=image_size,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            pad_to_square=pad,
            resize="shortest_edge_crop",
            anyres=anyres,
        ),
        image_token_id=IMAGE_TOKEN_INDEX,
        preset="llava-next" if anyres else "llava-1.5" if projector == "mlp2x_gelu" else "llava",
    )


def extra_tensors(path: Path, hf: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's weights from ``mm_vision_tower`` when the checkpoint does not hold them."""
    if any(k.startswith("model.vision_tower.") for k in tensors):
        return {}
    f = _tower_dir(hf) / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f}: the vision tower's weights are missing (safetensors only)")
    out = {}
    with safe_open(str(f), framework="pt") as sf:
        for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
            # A CLIPVisionModel saves "vision_model.*"; a full CLIPModel also has the text side, which is skipped.
            if k.startswith("vision_model."):
                out["model.vision_tower.vision_tower." + k[len("vision_model.") :]] = sf.get_tensor(k)
            elif not k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
                out["model.vision_tower.vision_tower." + k] = sf.get_tensor(k)
    return out
