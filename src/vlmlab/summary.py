"""``vlmlab inspect PRESET``: a model's parts, parameter counts, what each training stage trains, and the visual
tokens an image of a given size becomes.

The model is built on the ``meta`` device (shapes without storage), so a 7B preset is inspected in a second and
without its weights or tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlmlab.presets import PRESETS
from vlmlab.processing.processor import image_token_counts
from vlmlab.training.stages import apply_stage


def _count(params) -> int:
    return sum(p.numel() for p in params)


def summarize(preset_name: str, image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Parts (registry name, parameters), stages (trainable parameters), visual tokens per image size."""
    from vlmlab.models.vlm import PARTS, VisionLanguageModel

    preset = PRESETS[preset_name]()
    config = preset.config
    with torch.device("meta"):
        model = VisionLanguageModel(config, load_pretrained=False)
    names = {
        "vision": config.vision.name,
        "connector": config.connector.name,
        "newline": "image_newline",
        "fusion": fusion_name(config.fusion),
        "language": model.config.language.model_type,
    }
    parts = {
        part: {"name": names[part], "params": _count(model.part_parameters(part))}
        for part in PARTS
        if model.part_parameters(part)
    }
    total = _count(model.parameters())
    stages = []
    for stage in preset.recipe:
        groups = apply_stage(model, stage)
        trainable = _count(p for g in groups for p in g["params"])
        stages.append(
            {
                "name": stage.name,
                "objective": stage.objective,
                "train": list(stage.train),
                "trainable_params": trainable,
                "steps": stage.steps,
                "batch_size": stage.batch_size,
            }
        )
    proc = config.processor
    image_sizes = image_sizes or [(proc.image_size, proc.image_size)]
    tokens = {
        f"{h}x{w}": n
        for (h, w), n in zip(
            image_sizes, (image_token_counts(proc, model.num_image_tokens, [s])[0] for s in image_sizes)
        )
    }
    return {
        "preset": preset_name,
        "description": preset.description,
        "parts": parts,
        "total_params": total,
        "stages": stages,
        "tokens_per_view": model.num_image_tokens,
        "cross_attention_tokens": model.num_media_tokens if model.gated else None,
        "image_size": proc.image_size,
        "tiling": proc.tiler or ("anyres" if proc.anyres is not None else None),
        "visual_tokens": tokens,
        "config": dataclasses.asdict(config),
    }


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def render(s: dict[str, Any]) -> str:
    """The summary as the text ``vlmlab inspect`` prints."""
    w = max([22] + [len(p["name"]) + 2 for p in s["parts"].values()])
    lines = [f"{s['preset']}: {s['description']}", "", f"{'part':<11}{'module':<{w}}{'params':>12}"]
    for part, p in s["parts"].items():
        lines.append(f"{part:<11}{p['name']:<{w}}{_m(p['params']):>12}  ({p['params']:,})")
    lines.append(f"{'total':<{11 + w}}{_m(s['total_params']):>12}  ({s['total_params']:,})")
    lines += ["", f"{'stage':<20}{'objective':<16}{'trains':<34}{'trainable':>12}{'share':>8}"]
    for st in s["stages"]:
        share = st["trainable_params"] / s["total_params"]
        lines.append(
            f"{st['name']:<20}{st['objective']:<16}{'+'.join(st['train']):<34}"
            f"{_m(st['trainable_params']):>12}{share:>8.1%}"
        )
    tiling = f", tiling {s['tiling']}" if s["tiling"] else ""
    lines += ["", f"visual tokens per image ({s['tokens_per_view']} per {s['image_size']} px view{tiling}):"]
    lines += [f"  {size:>11}: {n}" for size, n in s["visual_tokens"].items()]
    if s.get("cross_attention_tokens"):
        lines.append(
            f"  (each image token stands for {s['cross_attention_tokens']} features read by cross-attention)"
        )
    return "\n".join(lines)


def fusion_name(fusion) -> str:
    """``routed (expert)``, ``cross (gated)``, ``routed (expert) + cross (parallel)``, ``regional (SVA)``; empty
    without fusion."""
    if fusion is None:
        return ""
    names = [f"routed ({fusion.mode})"] if fusion.mode else []
    if fusion.cross is not None:
        names.append(f"cross ({fusion.cross.kind})")
    if getattr(fusion, "regional", None) is not None:
        names.append("regional (SVA)")
    return " + ".join(names)
