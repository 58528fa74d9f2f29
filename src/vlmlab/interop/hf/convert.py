"""Generic transformers <-> vlmlab conversion driven by a model type's declarative key map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmlab.errors import CheckpointError

CONFIG = "config.json"


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A transformers directory (its config.json names a ``model_type``), not a vlmlab one."""
    f = Path(path) / CONFIG
    if not f.is_file():
        return False
    try:
        return "model_type" in json.loads(f.read_text())
    except json.JSONDecodeError:
        return False


def _rename(key: str, key_map: list[tuple[str, str]]) -> str | None:
    for src, dst in key_map:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint; pickled ``.bin`` files are refused."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(path.glob("*.bin")):
        raise CheckpointError(
            f"{path}: only pickled .bin weights; vlmlab loads safetensors only (convert first)"
        )
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        f = path / shard
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensors[k] = sf.get_tensor(k)
    return tensors


def import_hf(path: str | os.PathLike, formats) -> object:
    """A ``VisionLanguageModel`` built from a transformers checkpoint directory (weights mapped, not wrapped)."""
    from vlmlab.models.vlm import VisionLanguageModel

    path = Path(path)
    hf_config = json.loads((path / CONFIG).read_text())
    fmt = formats[hf_config["model_type"]]
    if hasattr(fmt, "config_extras"):  # settings kept beside config.json (e.g. a token id in the tokenizer)
        hf_config = {**hf_config, **fmt.config_extras(path, hf_config)}
    preprocessor = read_preprocessor_config(path)
    model = VisionLanguageModel(fmt.config_from_hf(hf_config, preprocessor), load_pretrained=False)
    tensors = read_hf_tensors(path)
    if hasattr(fmt, "extra_tensors"):  # e.g. a vision tower stored beside the checkpoint
        tensors.update(fmt.extra_tensors(path, hf_config, tensors))
    if hasattr(fmt, "import_tensors"):  # tensors that are not a rename (split, merged, renumbered layers)
        tensors = fmt.import_tensors(tensors, hf_config)
    state = {}
    for key, tensor in tensors.items():
        new = _rename(key, [*getattr(fmt, "IMPORT_ALIASES", []), *fmt.KEY_MAP])
        if new is None:
            raise CheckpointError(
                f"{path}: unexpected tensor {key!r} for model type {hf_config['model_type']!r}"
            )
        state[new] = tensor
    model.load_state_dict_strict(state, source=str(path))
    return model


def export_hf(model, path: str | os.PathLike, formats, model_type: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads with its own class."""
    fmt = formats[model_type]
    config = fmt.export_config(model)  # first: it names what the format cannot hold, before any tensor
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inverse = [(dst, src) for src, dst in fmt.KEY_MAP]
    state, seen = {}, {}
    for key, tensor in model.state_dict().items():
        if hasattr(fmt, "export_drops") and fmt.export_drops(key):  # vlmlab-only tensors (e.g. stage-1 heads)
            continue
        new = _rename(key, inverse)
        if new is None:
            raise CheckpointError(f"{model_type}: no transformers name for tensor {key!r}")
        # Tied tensors (an LM head sharing the embedding) are written once, as transformers does.
        if tensor.data_ptr() in seen and torch.equal(tensor, state[seen[tensor.data_ptr()]]):
            continue
        seen[tensor.data_ptr()] = new
        state[new] = tensor.detach().contiguous().cpu()
    if hasattr(fmt, "export_tensors"):  # the inverse of import_tensors, on transformers' names
        state = fmt.export_tensors(state, model)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2))


def export_hf_processor(model, processor, path: str | os.PathLike, formats, model_type: str) -> bool:
    """Beside an ``export_hf`` checkpoint: transformers' processor for ``model_type`` built by the format's
    ``export_processor(model, processor)`` (tokenizer, chat template, image settings), or the tokenizer alone
    where the format has none. Returns whether a processor was written."""
    make = getattr(formats[model_type], "export_processor", None)
    hf_processor = make(model, processor) if make is not None else None
    if hf_processor is None:
        processor.tokenizer.save_pretrained(str(path))
        return False
    hf_processor.save_pretrained(str(path))
    # transformers 5 keeps the image settings inside processor_config.json; 4.x (what a serving engine may pin)
    # reads preprocessor_config.json: both are written.
    hf_processor.image_processor.save_pretrained(str(path))
    return True


def read_preprocessor_config(path: Path) -> dict | None:
    """The image processor settings beside a checkpoint: ``preprocessor_config.json`` (transformers 4.x and 5), or
    the ``image_processor`` entry of ``processor_config.json`` (what transformers 5 alone writes); None."""
    pre, proc = path / "preprocessor_config.json", path / "processor_config.json"
    try:
        if pre.is_file():
            return json.loads(pre.read_text())
        if proc.is_file():
            return json.loads(proc.read_text()).get("image_processor")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{pre if pre.is_file() else proc}: invalid JSON ({e})") from None
    return None
