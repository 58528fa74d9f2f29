"""A training stage is a value: its name, which parts train, per-part learning rates, its data and its length.

``apply_stage`` is the one function that decides what a stage trains (it sets ``requires_grad`` and builds the
optimizer's parameter groups); the trainer logs its result. The survey's two-stage recipe (LLaVA, SYSTEMS.md §3):
``align`` trains the connector only on captions; ``instruct`` trains connector + LLM on instructions (and may
unfreeze the vision tower with a learning rate 5-10x below the LLM's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.vlm import PARTS


@dataclass
class Stage:
    name: str
    train: tuple[str, ...]
    """Parts that train (``vision``, ``connector``, ``newline``, ``language``); every other part is frozen."""
    lr: dict[str, float]
    """Peak learning rate per trained part (e.g. vision 10x below the LLM)."""
    steps: int
    """Optimizer steps (each of ``batch_size * grad_accum`` samples)."""
    data: tuple[str, ...] = ("train.json",)
    """Data files (LLaVA JSON or JSONL), relative to the data root unless absolute."""
    tasks: tuple[str, ...] | None = None
    """Keep only records of these tasks (``None`` keeps all)."""
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    front_layout: float = 0.0
    """Fraction of multi-image samples shown with every ``<image>`` moved to the front of the prompt (LLaVA-NeXT-
    Interleave mixes both layouts); the rest keep their interleaved layout."""
    objective: str = "lm"
    """What the stage minimises (``vlmlab.training.objectives.OBJECTIVES``): ``lm`` next-token prediction, a
    connector's own pretraining objectives (e.g. BLIP-2's Q-Former stage 1), or ``dpo`` on preference pairs
    (``vlmlab.training.dpo``; its settings in ``extra["dpo"]``, e.g. ``{"beta": 0.1}``)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes recorded with the run (e.g. why the recipe is what it is)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.train if p not in PARTS]
        if bad:
            raise ConfigError(f"stage {self.name!r}: unknown part(s) {bad}; valid parts: {list(PARTS)}")
        missing = [p for p in self.train if p not in self.lr]
        if missing:
            raise ConfigError(f"stage {self.name!r}: no learning rate for trained part(s) {missing}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"stage {self.name!r}: steps, batch_size and grad_accum must be >= 1")


def apply_stage(model: nn.Module, stage: Stage) -> list[dict]:
    """Freeze everything but ``stage.train``; return AdamW parameter groups, one per trained part."""
    groups = []
    for part in PARTS:
        if hasattr(model, "part_parameters"):
            params = model.part_parameters(part)
        else:  # any module with attributes named like the parts
            params = list(getattr(model, part).parameters()) if hasattr(model, part) else []
        trains = part in stage.train
        for p in params:
            p.requires_grad_(trains)
        if trains and params:
            groups.append(
                {"name": part, "params": params, "lr": stage.lr[part], "weight_decay": stage.weight_decay}
            )
    return groups


def describe_groups(model: nn.Module, groups: list[dict]) -> list[str]:
    """Human-readable lines: trainable parameter count per group, and the frozen total."""
    lines = []
    trainable = 0
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        trainable += n
        lines.append(f"  train {g['name']:<10} {n:>12,} params  lr {g['lr']:.2e}")
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"  frozen{'':<11}{total - trainable:>12,} params")
    return lines
