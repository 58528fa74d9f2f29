"""Checkpoints in and out, one module per ``config.json`` ``model_type``: transformers' own (``llava``) and the
original repositories' (``llava_llama``, haotian-liu/LLaVA); ``llava_next``, ``llava_next_video`` and ``llava_onevision``
share one module.

[Contract] An importer module provides ``config_from_hf(hf_config: dict) -> ModelConfig``, ``KEY_MAP`` (a list of
``(transformers prefix, vlmlab prefix)`` pairs, applied to whole key prefixes) and ``export_config(model) -> dict``.
Key maps are declarative and loading fails loudly on missing, unexpected or mis-shaped tensors. Optional:
``extra_tensors(path, hf_config, tensors)`` (tensors stored beside the checkpoint), ``import_tensors(tensors,
hf_config)`` / ``export_tensors(state, model)`` (tensors that are not a rename: split, concatenated or renumbered,
before the import's renaming and after the export's), ``export_drops(key)`` (vlmlab-only tensors), ``config_extras(path, hf_config) -> dict`` (settings kept beside
``config.json``, merged into it before ``config_from_hf``), ``export_processor(model, processor)`` (transformers'
processor that makes vlmlab's inputs, written by ``vlmlab.save(..., format="hf")``; None: the tokenizer alone).
"""

from vlmlab.interop.hf import fuyu, idefics1, internvl, llava, mllama
from vlmlab.interop.hf.blip2 import blip_2, instructblip
from vlmlab.interop.hf.convert import export_hf, export_hf_processor, import_hf, is_hf_checkpoint
from vlmlab.interop.hf.idefics import idefics2, idefics3
from vlmlab.interop.hf.llava_next import hf_model_type, llava_next, llava_next_video, llava_onevision
from vlmlab.interop.original import llava as original_llava
from vlmlab.registry import Registry

HF_FORMATS = Registry("transformers model type")
HF_FORMATS["llava"] = llava
HF_FORMATS["llava_next"] = llava_next
HF_FORMATS["llava_next_video"] = llava_next_video
HF_FORMATS["llava_onevision"] = llava_onevision
HF_FORMATS["llava_llama"] = original_llava
HF_FORMATS["idefics"] = idefics1
HF_FORMATS["idefics2"] = idefics2
HF_FORMATS["idefics3"] = idefics3
HF_FORMATS["blip-2"] = blip_2
HF_FORMATS["instructblip"] = instructblip
HF_FORMATS["internvl"] = internvl
HF_FORMATS["mllama"] = mllama
HF_FORMATS["fuyu"] = fuyu

__all__ = ["HF_FORMATS", "export_hf", "export_hf_processor", "hf_model_type", "import_hf", "is_hf_checkpoint"]
