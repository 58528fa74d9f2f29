"""Direct Preference Optimization (Rafailov et al. 2023), LLaVA-NeXT-Video's last stage (SYSTEMS.md §12).

For a pair (prompt x, chosen y_w, rejected y_l), with log pi(y|x) the summed log-probability of the answer's
supervised tokens (media, prompt and padding excluded) under the trained policy and pi_ref under a frozen reference:

    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

averaged over the pairs. The implicit rewards are r = beta * (log pi - log pi_ref); logged per step: ``dpo_loss``,
``reward_margin`` (mean r_w - r_l), ``reward_accuracy`` (fraction of pairs with r_w > r_l), ``chosen_reward``,
``rejected_reward``, ``sft_loss``. At the start of the stage the policy *is* the reference, so every margin is 0 and
the loss is exactly log 2 (invariant 3).

LLaVA-NeXT's settings (``scripts/train/dpo.sh``: ``--dpo_alpha 1.0 --beta 0.1 --gamma 0``; its DPO trainer,
``trl/trainer/dpo_trainer.py`` ``get_batch_loss_metrics``, computes ``dpo_alpha * dpo_loss + gamma * sft_loss``).
So ``dpo_alpha`` is the weight of the DPO term and ``gamma`` the weight of an SFT term, the mean next-token loss on
the chosen answers; here ``dpo_weight`` (default 1.0) and ``sft_weight`` (default 0.0). A stage sets them, and
``beta``, in ``Stage.extra["dpo"]`` (e.g. ``{"beta": 0.1}``). Sigmoid loss, no label smoothing, summed (not
averaged) log-probs: trl's defaults there.

The reference: a frozen copy (no grad, eval mode) of the model as it is when the DPO stage starts, kept outside the
model so it is never in a checkpoint. [Contract] ``Trainer`` calls ``begin_stage(model, stage, state_dir, fresh)``
before the stage's first step (``fresh``: the model holds the stage's starting weights) and on resume (``fresh``
False). A fresh start writes the reference weights once to ``state_dir`` (``run_dir/objective/stage-<i>``, an
atomic safetensors checkpoint, the size of the model); a resumed stage loads them from there, so its reference is
bit-identical to the uninterrupted run's. (LLaVA-NeXT loads the SFT checkpoint a second time as ``ref_model``.)
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import CheckpointError, ConfigError, SampleError
from vlmlab.processing.processor import IGNORE_INDEX, visual_inputs
from vlmlab.training.checkpoint import is_complete, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    """Temperature of the implicit reward (LLaVA-NeXT-Video: 0.1)."""
    dpo_weight: float = 1.0
    """LLaVA-NeXT's ``dpo_alpha``: the weight of the DPO term."""
    sft_weight: float = 0.0
    """LLaVA-NeXT's ``gamma``: the weight of the chosen answers' next-token loss (0 in LLaVA-NeXT-Video)."""

    @classmethod
    def from_stage(cls, stage) -> DPOSettings:
        given = dict(stage.extra.get("dpo", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(
                f"stage {stage.name!r}: unknown dpo setting(s) {unknown}; valid: {sorted(names)}"
            )
        settings = cls(**{k: float(v) for k, v in given.items()})
        if settings.beta <= 0:
            raise ConfigError(f"stage {stage.name!r}: dpo beta must be > 0, got {settings.beta}")
        return settings


@dataclass
class DPOOutput:
    loss: torch.Tensor
    terms: dict[str, float]
    margins: torch.Tensor
    """``[B]`` (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), detached."""


def answer_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps [rows], token_logps [rows, T-1])``: each row's summed log-probability of its supervised tokens
    (fp32), and the per-token values (0 where unsupervised)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        **visual_inputs(batch),
        supervised_logits_only=True,
    )
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX  # [R, T-1]
    logits = out.logits  # [N_sup, V]: only the supervised positions, in row-major order
    if logits.dim() == 3:  # a decoder whose head is not a plain Linear returns every position
        logits = logits[:, :-1][keep]
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets[keep][:, None]).squeeze(-1)
    tokens = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
    return tokens.sum(-1), tokens


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` and the implicit rewards of the chosen and rejected answers ``[B]`` (detached)."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * margin)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_step(model: nn.Module, reference: nn.Module, batch: dict, settings: DPOSettings = DPOSettings()):
    """The DPO objective on a batch of ``collate_pairs`` layout: rows ``0..B-1`` chosen, ``B..2B-1`` rejected."""
    pairs = batch.get("pairs")
    if not pairs or batch["input_ids"].shape[0] != 2 * pairs:
        raise SampleError(
            "the dpo objective needs preference pairs (records with 'chosen' and 'rejected'); this batch has none"
        )
    policy, tokens = answer_logps(model, batch)
    with torch.no_grad():
        ref, _ = answer_logps(reference, batch)
    losses, chosen_r, rejected_r = dpo_loss(
        policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], settings.beta
    )
    dpo = losses.mean()
    # trl/LLaVA-NeXT's SFT term: mean next-token loss over the chosen answers' supervised tokens.
    n_chosen = (batch["labels"][:pairs, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    sft = -tokens[:pairs].sum() / n_chosen
    loss = settings.dpo_weight * dpo
    if settings.sft_weight:  # skipped at 0, so an infinite SFT loss cannot turn the DPO loss into nan
        loss = loss + settings.sft_weight * sft
    margins = (chosen_r - rejected_r) / settings.beta
    terms = {
        "dpo_loss": dpo.item(),
        "sft_loss": sft.item(),
        "reward_margin": (chosen_r - rejected_r).mean().item(),
        "reward_accuracy": (chosen_r > rejected_r).float().mean().item(),
        "chosen_reward": chosen_r.mean().item(),
        "rejected_reward": rejected_r.mean().item(),
    }
    return DPOOutput(loss=loss, terms=terms, margins=margins)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that never trains: no gradients, eval mode."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


class DPOObjective:
    """The ``dpo`` entry of ``OBJECTIVES``: ``objective(model, batch)`` with the reference ``begin_stage`` (or
    ``attach``) gave that model. References are held weakly by model, outside it (never in its state dict)."""

    def __init__(self) -> None:
        self._references: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def attach(self, model: nn.Module, reference: nn.Module, settings: DPOSettings = DPOSettings()) -> None:
        self._references[model] = (reference, settings)

    def reference_of(self, model: nn.Module) -> nn.Module | None:
        entry = self._references.get(model)
        return entry[0] if entry is not None else None

    def begin_stage(self, model: nn.Module, stage, state_dir: Path, fresh: bool) -> None:
        """Build the stage's reference: the model as it is now (``fresh``), saved to ``state_dir``; or, for a
        resumed stage, the weights saved there when the stage started."""
        settings = DPOSettings.from_stage(stage)
        reference = frozen_copy(model)
        if fresh:
            save_checkpoint(state_dir, tensors={"model": model.state_dict()}, state={"stage": stage.name})
        else:
            if not is_complete(state_dir):
                raise CheckpointError(
                    f"{state_dir}: stage {stage.name!r} is resumed but the reference weights saved when it "
                    "started are missing; restart the stage from its first step"
                )
            tensors, _ = load_checkpoint(state_dir)
            reference.load_state_dict_strict(tensors["model"], source=str(state_dir))
        self.attach(model, reference, settings)

    def __call__(self, model: nn.Module, batch: dict) -> DPOOutput:
        entry = self._references.get(model)
        if entry is None:
            raise ConfigError(
                "the dpo objective has no reference model for this model: the Trainer makes one when a dpo "
                "stage starts (or call dpo.attach(model, frozen_copy(model)))"
            )
        return dpo_step(model, entry[0], batch, entry[1])


dpo = DPOObjective()
