"""The public entry points: build a model from a preset, save it, load it back with one call."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vlmlab.errors import ConfigError
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS, Preset
from vlmlab.processing.processor import Processor


def build(preset: str | Preset, load_pretrained: bool = True) -> tuple[VisionLanguageModel, Processor]:
    """A fresh model and its processor from a preset name (see ``vlmlab presets``) or a ``Preset``."""
    p = PRESETS[preset]() if isinstance(preset, str) else preset
    tokenizer = p.make_tokenizer()
    video = p.config.processor.video
    config = dataclasses.replace(
        p.config,
        image_token_id=tokenizer.convert_tokens_to_ids(p.config.processor.image_token),
        video_token_id=tokenizer.convert_tokens_to_ids(video.token) if video and not video.as_images else -1,
    )
    model = VisionLanguageModel(config, load_pretrained=load_pretrained)
    vocab = model.embedded_vocab(tokenizer)
    if vocab != model.language.get_input_embeddings().num_embeddings:
        model.resize_vocab(vocab)
    return model, Processor(tokenizer, config.processor, model.num_image_tokens)


def save(
    model: VisionLanguageModel, processor: Processor, path: str | os.PathLike, format: str = "vlmlab"
) -> list[str]:
    """A self-contained model directory, written atomically (an interrupted save leaves the previous one); returns
    the file names written.

    ``format="vlmlab"``: config, weights, tokenizer and processor settings (``vlmlab.load`` reads it back).
    ``format="hf"``: what transformers and engines built on it (vLLM, SGLang) load: its model type's
    ``config.json`` and weights, the tokenizer with its chat template, and, where transformers has the model
    type's processor (``llava``, ``llava_next``), its ``preprocessor_config.json`` / ``processor_config.json``,
    set so that ``AutoProcessor`` makes the ``input_ids`` and ``pixel_values`` vlmlab's processor makes."""
    from vlmlab.io import write_directory

    if format not in ("vlmlab", "hf"):
        raise ConfigError(f"save: format {format!r} is not one of ['vlmlab', 'hf']")

    def write(tmp: Path) -> None:
        if format == "hf":
            from vlmlab.interop.hf import HF_FORMATS, export_hf, export_hf_processor, hf_model_type

            model_type = hf_model_type(model.config)
            export_hf(model, tmp, HF_FORMATS, model_type)
            export_hf_processor(model, processor, tmp, HF_FORMATS, model_type)
        else:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

    out = write_directory(
        path, write, replaceable=lambda p: (p / "config.json").is_file() or not any(p.iterdir())
    )
    return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())


def from_pretrained(path: str | os.PathLike) -> VisionLanguageModel:
    """A model from a vlmlab directory or a transformers checkpoint directory (``llava``, ``llava_next``,
    ``llava_next_video``, ``llava_onevision``; the original LLaVA repository's ``llava_llama``), as vlmlab's own
    composition: transformers' weights are mapped onto vlmlab's parts, not wrapped."""
    from vlmlab.interop.hf import HF_FORMATS, import_hf, is_hf_checkpoint

    if is_hf_checkpoint(path):
        return import_hf(path, HF_FORMATS)
    return VisionLanguageModel.from_pretrained(path)


def load(path: str | os.PathLike) -> tuple[VisionLanguageModel, Processor]:
    """Load a model directory or a training checkpoint (both hold the same files), or a transformers
    checkpoint directory with its tokenizer (the processor then follows its config and preprocessor_config)."""
    from vlmlab.interop.hf import is_hf_checkpoint

    path = Path(path)
    if is_hf_checkpoint(path):
        from transformers import AutoTokenizer

        model = from_pretrained(path)
        from vlmlab.processing.processor import load_qformer_tokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        placeholder_in_vocabulary(model, tokenizer)
        processor = Processor(
            tokenizer, model.config.processor, model.num_image_tokens, load_qformer_tokenizer(path)
        )
        return model, processor
    return VisionLanguageModel.from_pretrained(path), Processor.from_pretrained(path)


def placeholder_in_vocabulary(model: VisionLanguageModel, tokenizer) -> None:
    """The original LLaVA repository marks each image with id -200, outside any vocabulary, and its tokenizer has
    no ``<image>``: its prompts are split on the text and the id spliced in. vlmlab's processor (and transformers'
    ``LlavaProcessor``) need the placeholder as a token, so it is added to ``tokenizer`` (if missing) and becomes
    the model's id, and the decoder grows to embed it: new rows at the mean of the old ones, as transformers'
    conversion script (``convert_llava_weights_to_hf.py``) does. The logits of every other token are unchanged,
    and the new token's is their mean, never the largest: greedy decoding is unchanged too."""
    if model.config.image_token_id >= 0:
        return
    from tokenizers import AddedToken

    token = model.config.processor.image_token
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        tid = tokenizer.convert_tokens_to_ids(token)
    model.config.image_token_id = tid
    if tid >= model.language.get_input_embeddings().num_embeddings:
        model.resize_vocab(len(tokenizer))  # tid < len(tokenizer)
