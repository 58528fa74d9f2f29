"""Training objectives: what a stage minimises, chosen by name (``Stage.objective``) from ``OBJECTIVES``.

[Contract] An objective is ``fn(model, batch) -> output`` with a scalar ``output.loss`` (and, optionally, the
separate terms it summed as ``output.terms``: a dict of name -> float, logged with the step). ``batch`` is the
processor's collated batch (``input_ids``, ``attention_mask``, ``labels``, the visual inputs). Add one: a function
and one line below. ``lm`` is next-token prediction on the supervised tokens, the loss of every prefix-embedding
system's stages.
"""

from __future__ import annotations

from vlmlab.errors import ConfigError
from vlmlab.processing.processor import visual_inputs
from vlmlab.registry import Registry
from vlmlab.training.dpo import dpo
from vlmlab.training.qformer import qformer_stage1


def lm_loss(model, batch: dict):
    """The mean next-token loss over supervised positions (the LM head computed only there)."""
    if batch.get("pairs") is not None:  # chosen + rejected rows: training on both would teach the rejected
        raise ConfigError(
            "a stage with objective 'lm' got preference pairs (chosen/rejected); use objective 'dpo'"
        )
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        **visual_inputs(batch),
        supervised_logits_only=True,
    )


OBJECTIVES = Registry("training objective")
OBJECTIVES["lm"] = lm_loss
OBJECTIVES["qformer_stage1"] = qformer_stage1
OBJECTIVES["dpo"] = dpo  # needs preference pairs; its reference is made when the stage starts
