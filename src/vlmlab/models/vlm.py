"""VisionLanguageModel: images -> vision tower -> connector -> merge into the token sequence -> language model.

The early-fusion composition of SYSTEMS.md §0 (LLaVA family and every "prefix-embedding" model). Parts are
chosen by name from the registries; the decoder is an unmodified transformers causal LM fed ``inputs_embeds``,
so text-only input gives exactly the bare LM's logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmlab.config import ModelConfig
from vlmlab.errors import CheckpointError, ConfigError, SampleError
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.encoders import ENCODERS
from vlmlab.models.language import architecture_params, build_language_model, cache_kwargs
from vlmlab.models.merge import merge_image_features

# The parts a training stage can freeze or train, by name (see training/stages.py).
PARTS = ("vision", "connector", "language")
CONFIG_FILE = "config.json"
IGNORE_INDEX = -100
WEIGHTS_FILE = "model.safetensors"


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, load_pretrained: bool = True):
        super().__init__()
        config = copy.deepcopy(config)  # loading never mutates the caller's config
        # Without load_pretrained (e.g. loading a checkpoint) nothing is read from the pretrained sources: the
        # architecture comes from the recorded params and the weights from the checkpoint.
        vision_config = (
            config.vision if load_pretrained else dataclasses.replace(config.vision, pretrained=None)
        )
        self.vision = ENCODERS[config.vision.name](vision_config)
        self.language = build_language_model(config.language, load_pretrained)
        # Record full architectures so the checkpoint rebuilds without the pretrained sources.
        if hasattr(self.vision, "architecture_params"):
            config.vision.params = self.vision.architecture_params()
        config.language.params = architecture_params(self.language)
        config.language.model_type = self.language.config.model_type
        d_lm = self.language.config.hidden_size
        self.connector = CONNECTORS[config.connector.name](
            self.vision.hidden_size, d_lm, **config.connector.params
        )
        self.config = config
        self.num_image_tokens = self.connector.num_tokens(self.vision.num_tokens)

    # -- forward -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N_img, 3, H, W] -> [N_img, N_tok, D_lm]``."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual features spliced into the image placeholder positions."""
        image_mask = input_ids == self.config.image_token_id
        # The placeholder id may lie outside the decoder's vocabulary: look up a valid id, then overwrite.
        embeds = self.language.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is not None:
            feats = self.encode_images(pixel_values.to(embeds.dtype))
            embeds = merge_image_features(embeds, input_ids, feats, self.config.image_token_id)
        elif image_mask.any():
            n = int(image_mask.sum())
            raise SampleError(f"{n} image placeholder tokens in the input but no pixel_values")
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        supervised_logits_only: bool = False,
        **_: object,
    ) -> CausalLMOutputWithPast:
        """transformers' contract: ``.logits`` ``[B, T, V]`` and, with ``labels``, the mean next-token loss.

        ``supervised_logits_only=True`` (the trainer's setting) computes the LM head only where a label is
        supervised and returns those rows as ``.logits`` ``[N_sup, V]``: the same loss without the ``[B, T, V]``
        logits of every prompt, image and pad position."""
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = positions_from_mask(attention_mask)
        inputs_embeds = self.embed(input_ids, pixel_values)
        if (
            labels is not None
            and supervised_logits_only
            and past_key_values is None
            and _plain_head(self.language)
        ):
            return self._supervised_loss(inputs_embeds, attention_mask, position_ids, labels)
        # Contract: labels are unshifted and -100 at image/prompt/pad positions; the decoder's loss shifts them.
        return self.language(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            **cache_kwargs(self.language, past_key_values),
        )

    def _supervised_loss(self, inputs_embeds, attention_mask, position_ids, labels) -> CausalLMOutputWithPast:
        hidden = self.language.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.language.get_output_embeddings()(hidden[:, :-1][keep])  # [N_sup, V]
        # transformers' causal LM loss: float32 cross-entropy, mean over supervised tokens.
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """New token ids ``[B, T_new]``; see ``vlmlab.inference.generate.generate``."""
        from vlmlab.inference.generate import generate

        return generate(self, input_ids, **kwargs)

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, format: str = "vlmlab") -> None:
        """``format="vlmlab"``: ``config.json`` + ``model.safetensors`` (tied weights stored once).
        ``format="hf"``: a transformers checkpoint its own class loads (``llava`` for a CLIP/SigLIP tower with
        the ``mlp2x_gelu`` connector)."""
        if format == "hf":
            from vlmlab.interop.hf import HF_FORMATS, export_hf

            export_hf(self, path, HF_FORMATS, "llava")
            return
        if format != "vlmlab":
            raise ConfigError(f"save_pretrained: format {format!r} is not one of ['vlmlab', 'hf']")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_model(self, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VisionLanguageModel:
        path = Path(path)
        cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (cfg_file, weights):
            if not f.is_file():
                raise CheckpointError(f"{path}: missing {f.name} (not a vlmlab model directory)")
        try:
            config = ModelConfig.from_dict(json.loads(cfg_file.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
        model = cls(config, load_pretrained=False)
        model.load_state_dict_strict(load_file(str(weights)), source=str(weights))
        return model

    def load_state_dict_strict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load every tensor, failing loudly on missing, unexpected or mis-shaped keys."""
        own = self.state_dict()
        # Aliased tensors (a tied LM head) are stored once: a group is present if any of its names is.
        missing = sorted(
            k for group in _alias_groups(self) if not any(n in state for n in group) for k in group
        )
        unexpected = sorted(k for k in state if k not in own)
        shapes = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                raise CheckpointError(f"{source}: {len(keys)} {what} tensor(s): {', '.join(keys[:3])}{more}")
        self.load_state_dict(state, strict=False)


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the storage they share (most groups have one name)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(t.data_ptr(), []).append(name)
    return list(groups.values())


def _plain_head(language) -> bool:
    """The decoder's logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after the head)."""
    cfg = language.config
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip left padding: 0 at each sample's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
