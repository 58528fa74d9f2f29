"""VisionLanguageModel: images -> vision tower -> connector -> merge into the token sequence -> language model.

The early-fusion composition of SYSTEMS.md §0 (LLaVA family and every "prefix-embedding" model). Parts are
chosen by name from the registries; the decoder is an unmodified transformers causal LM fed ``inputs_embeds``,
so text-only input gives exactly the bare LM's logits.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmlab.config import ModelConfig
from vlmlab.errors import CheckpointError, ConfigError, SampleError
from vlmlab.models import video
from vlmlab.models.connectors import CONNECTORS
from vlmlab.models.encoders import ENCODERS
from vlmlab.models.language import architecture_params, build_language_model, cache_kwargs
from vlmlab.models.merge import merge_image_features
from vlmlab.models.tiling import TILERS, anyres

# The parts a training stage can freeze or train, by name (see training/stages.py). ``newline`` is LLaVA-NeXT's
# learned ``image_newline`` (absent in models without it): its stage 1 trains the projector alone; it also
# holds a packing tiler's learned vectors (``packer``, e.g. XComposer2-4KHD's separators). ``fusion`` is
# the image-row weights inside the decoder (``config.fusion``: CogVLM's visual expert, XComposer2's partial LoRA),
# apart from ``language``, the LLM's own weights, so that a stage can train them with the LLM frozen.
PARTS = ("vision", "connector", "newline", "fusion", "language")
CONFIG_FILE = "config.json"
IGNORE_INDEX = -100
IMAGE_POSITIONS = ("sequential", "shared")
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
        self.extra_vision = nn.ModuleList(
            ENCODERS[c.name](c if load_pretrained else dataclasses.replace(c, pretrained=None))
            for c in config.extra_vision
        )
        for c, tower in zip(config.extra_vision, self.extra_vision):
            if hasattr(tower, "architecture_params"):
                c.params = tower.architecture_params()
        self.language = build_language_model(config.language, load_pretrained)
        # Record full architectures so the checkpoint rebuilds without the pretrained sources.
        if config.image_positions not in IMAGE_POSITIONS:
            raise ConfigError(
                f"image_positions: {config.image_positions!r} is not one of {list(IMAGE_POSITIONS)}"
            )
        self.fusion_params: list[nn.Parameter] = []
        self.cross_attn: nn.ModuleDict | None = None
        self.cross_vision: nn.Module | None = None
        self.regional_attn: nn.ModuleDict | None = None
        """Cambrian-1's in-decoder aggregation layers (``fusion.regional``), keyed by decoder layer index."""
        self._tower_runs: dict[int, tuple] | None = None
        """Inside ``fused`` with ``fusion.regional``: the towers' features of each pixel tensor seen, so that
        ``embed`` (the connector's input) and the re-aggregation (the decoder's) share one run of the towers."""
        if config.fusion is not None:
            self._build_fusion(config.fusion, load_pretrained)
        if hasattr(self.vision, "architecture_params"):
            config.vision.params = self.vision.architecture_params()
        config.language.params = architecture_params(self.language)
        config.language.model_type = self.language.config.model_type
        d_lm = self.language.config.hidden_size
        cross = config.fusion.cross if config.fusion is not None else None
        self.gated = cross is not None and cross.kind == "gated"
        """Flamingo-style: images reach the decoder only through gated cross-attention, not as tokens."""
        towers = [self.vision, *self.extra_vision]
        self.multi_encoder = getattr(CONNECTORS[config.connector.name], "multi_encoder", False)
        """The connector takes every tower's features (a list); else extra towers are concatenated on the grid."""
        if self.multi_encoder:
            in_dim, n_vis = [t.hidden_size for t in towers], [t.num_tokens for t in towers]
        else:
            in_dim, n_vis = sum(t.hidden_size for t in towers), self.vision.num_tokens
        proc = config.processor
        self.tiler = TILERS[proc.tiler](**proc.tiler_params) if proc.tiler else None
        self.packer = None
        """A packing tiler's module (``models/tiling/__init__.py``): each image's view features -> its rows,
        with learned vectors, before the connector."""
        if self.tiler is not None and hasattr(self.tiler, "packer"):
            if self.multi_encoder:
                raise ConfigError(f"tiler {proc.tiler!r} packs one grid per view: no multi-encoder connector")
            self.packer = self.tiler.packer(in_dim, proc.image_size)
            in_dim = self.packer.out_dim
        self.connector = CONNECTORS[config.connector.name](
            in_dim, (cross.media_dim or d_lm) if self.gated else d_lm, **config.connector.params
        )
        self.config = config
        if config.fusion is not None and config.fusion.regional is not None:
            from vlmlab.models.fusion.sva import build_regional

            self.regional_attn = build_regional(self.language.get_decoder(), self.connector, config)
            self.fusion_params += list(self.regional_attn.parameters())
        self.num_media_tokens = self.connector.num_tokens(n_vis)
        """Feature rows of one view (one image, tile or frame)."""
        if self.packer is not None and self.num_media_tokens != n_vis:
            raise ConfigError(
                f"tiler {proc.tiler!r} packs rows before the connector: connector "
                f"{config.connector.name!r} must keep rows one to one ({n_vis} -> {self.num_media_tokens})"
            )
        self.num_image_tokens = 1 if self.gated else self.num_media_tokens
        """Placeholder tokens of one view in the text (a gated cross-attention model writes one ``<image>``)."""
        if self.extra_vision and config.processor.video is not None:
            raise ConfigError("extra_vision: videos are encoded by the primary tower only (no extra towers)")
        if self.gated and (config.processor.anyres or config.processor.tiler or config.processor.video):
            raise ConfigError(
                "gated cross-attention models take one view per image (no anyres, tiler or video)"
            )
        tiles, frames = config.processor.anyres, config.processor.video
        if tiles is not None or frames is not None:
            self.grid_side = math.isqrt(self.num_image_tokens)
            if self.grid_side**2 != self.num_image_tokens:
                raise ConfigError(
                    f"AnyRes and video pooling need a square token grid per view, not {self.num_image_tokens} tokens "
                    f"(a tower without CLS, or vision.select_feature='patch')"
                )
        if frames is not None:
            video.check(frames)
        if (tiles is not None and tiles.newline) or (frames is not None and frames.newline != "no_token"):
            # LLaVA-NeXT's learned row separator, initialised as randn / sqrt(d) (its own trainable part).
            self.image_newline = nn.Parameter(torch.randn(d_lm) / math.sqrt(d_lm))
        else:
            self.image_newline = None

    def _build_fusion(self, f, load_pretrained: bool) -> None:
        """Routed layers (``f.mode``) and/or cross-attention blocks (``f.cross``), hooked into the decoder."""
        from vlmlab.models.fusion import ROUTING_MODES, apply_routing

        decoder = self.language.get_decoder()
        if f.mode is None and f.cross is None and f.regional is None:
            raise ConfigError(
                "fusion: neither mode (routed layers), cross (cross-attention) nor regional (re-aggregation) is set"
            )
        if f.mode is not None:
            if f.mode not in ROUTING_MODES:
                raise ConfigError(f"fusion.mode: {f.mode!r} is not one of {list(ROUTING_MODES)}")
            # On the decoder (not the causal LM): every path (training, generate, the fast step's fallback) runs it.
            self.fusion_params = apply_routing(decoder, f.mode, tuple(f.targets), rank=f.rank, alpha=f.alpha)
        if f.cross is not None:
            from vlmlab.models.fusion.cross import build_cross_attention

            self.cross_attn, self.cross_vision = build_cross_attention(
                self.language, f.cross, load_pretrained
            )
            self.fusion_params += list(self.cross_attn.parameters())
            if self.cross_vision is not None:
                self.fusion_params += list(self.cross_vision.parameters())

    def embedded_vocab(self, tokenizer) -> int:
        """How many token ids the decoder must embed for ``tokenizer``: all of them when a token added past the
        LLM's vocabulary reaches the decoder (a marker such as ``<img>``, or a gated model's ``<image>``), else
        the LLM's own size (placeholders past it are overwritten by features and never embedded)."""
        vocab = self.language.get_input_embeddings().num_embeddings
        overwritten = set() if self.gated else {self.config.image_token_id, self.config.video_token_id}
        beyond = [i for i in tokenizer.added_tokens_decoder if i >= vocab and i not in overwritten]
        return max(len(tokenizer), max(beyond) + 1) if beyond else vocab

    def resize_vocab(self, n: int) -> None:
        """Grow the decoder's embedding (and untied head) to ``n`` ids, as LLaVA does for added tokens; the new rows
        start at the mean of the old ones (transformers' ``resize_token_embeddings``). The config records it."""
        self.language.resize_token_embeddings(n)
        self.config.language.params["vocab_size"] = n

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters of one trainable part (``PARTS``)."""
        if part == "newline":
            params = [] if self.image_newline is None else [self.image_newline]
            return params + (list(self.packer.parameters()) if self.packer is not None else [])
        if part == "fusion":
            return list(self.fusion_params)
        params = list(getattr(self, part).parameters())
        if part == "vision":
            params += list(self.extra_vision.parameters())
        if part == "language" and self.fusion_params:
            fusion = {id(p) for p in self.fusion_params}
            params = [p for p in params if id(p) not in fusion]
        return params

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """RoPE positions of a (left- or right-padded) batch: padding skipped, image tokens per
        ``config.image_positions``."""
        if self.config.image_positions == "shared":
            return shared_image_positions(input_ids, attention_mask, self.config.image_token_id)
        return positions_from_mask(attention_mask)

    @contextlib.contextmanager
    def fused(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **extra):
        """The context in which the decoder runs over ``input_ids`` with this model's deep fusion
        (``config.fusion``): image placeholder rows routed to the image weights; the cross-attention blocks
        reading this batch's visual features (``cross_media``); the image rows re-reading the towers' regions
        (``fusion.regional``: the towers run once, at entry, and ``embed`` inside the context reuses their
        features, so call ``embed`` inside it). Positions after
        ``input_ids`` (generated tokens) are text rows that see what the last prompt token sees. A no-op without
        fusion."""
        with contextlib.ExitStack() as stack:
            f = self.config.fusion
            if f is not None and f.mode is not None:
                from vlmlab.models.fusion import routing

                stack.enter_context(
                    routing(self.language.get_decoder(), input_ids == self.config.image_token_id)
                )
            if self.cross_attn is not None:
                from vlmlab.models.fusion.cross import media

                stack.enter_context(
                    media(self.language.get_decoder(), *self.cross_media(input_ids, pixel_values, **extra))
                )
            if self.regional_attn is not None:
                from vlmlab.models.fusion.sva import regional

                stack.enter_context(self._towers_once())
                feats = None
                if pixel_values is not None:
                    feats = self.tower_features(pixel_values.to(self.dtype_of_vision()), **extra)
                decoder, image_id = self.language.get_decoder(), self.config.image_token_id
                stack.enter_context(regional(decoder, self.connector, feats, input_ids, image_id))
            yield

    @contextlib.contextmanager
    def _towers_once(self):
        """Within it, ``tower_features`` of the same pixel tensor (the same object, unmodified) runs the towers
        once; nested entries share the outermost's record, which is dropped at its exit."""
        if self._tower_runs is not None:
            yield
            return
        self._tower_runs = {}
        try:
            yield
        finally:
            self._tower_runs = None

    def cross_media(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **extra
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """What the cross-attention blocks read for this batch (``models/fusion/cross.py``, ``cross_media``):
        features ``[B, U, M, D_media]``, which of them each token sees ``[B, T, U]``, which rows are real."""
        from vlmlab.models.fusion.cross import cross_media

        return cross_media(self, input_ids, pixel_values, **extra)

    def dtype_of_vision(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    # -- forward -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, **extra: torch.Tensor | None) -> torch.Tensor:
        """``[N_img, 3, H, W] -> [N_img, N_tok, D_lm]``.

        ``extra`` holds the other inputs some parts take, each handed to the part that names it in its
        ``extra_inputs`` (e.g. a tower's ``pixel_attention_mask``, InstructBLIP's ``qformer_input_ids``)."""
        feats = self.tower_features(pixel_values, **extra)
        return self.connector(feats, **_inputs_of(self.connector, extra))

    def tower_features(self, pixel_values: torch.Tensor, **extra) -> torch.Tensor | list[torch.Tensor]:
        """The tower's ``[N, N_vis, D_vis]``; with ``extra_vision``, every tower on its own view of the images:
        a list for a multi-encoder connector, else concatenated on the primary's grid (``encoders/multi.py``)."""
        runs = self._tower_runs
        if runs is not None:
            seen = runs.get(id(pixel_values))
            if seen is not None and seen[0] is pixel_values and seen[1] == pixel_values._version:
                return seen[2]
        feats = self._run_towers(pixel_values, **extra)
        if runs is not None:
            runs[id(pixel_values)] = (pixel_values, pixel_values._version, feats)
        return feats

    def _run_towers(self, pixel_values: torch.Tensor, **extra) -> torch.Tensor | list[torch.Tensor]:
        if not self.extra_vision and not self.multi_encoder:
            return self.vision(pixel_values, **_inputs_of(self.vision, extra))
        from vlmlab.models.encoders.multi import concat_on_grid, tower_view

        proc = self.config.processor
        configs = [self.config.vision, *self.config.extra_vision]
        towers = [self.vision, *self.extra_vision]
        feats = [
            t(tower_view(pixel_values, proc, c), **_inputs_of(t, extra)) for t, c in zip(towers, configs)
        ]
        return feats if self.multi_encoder else concat_on_grid(feats)

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        **extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """Feature rows ``[N_rows, D_lm]`` of every image, in order.

        Without AnyRes ``pixel_values`` is ``[N_views, 3, S, S]`` (one view per image, or every image's tiles
        in order, e.g. InternVL's dynamic tiles), or ``[N_img, P, 3, S, S]``: images of up to ``P`` views where
        all-zero views are padding (transformers' Idefics layout; ``pixel_attention_mask`` ``[N_img, P, H, W]``
        alike). With it, it is transformers' layout
        ``[N_img, P_max, 3, S, S]`` (each image's views, zero-padded to the most views) or the views concatenated
        ``[sum P, 3, S, S]``, and ``image_sizes`` ``[N_img, 2]`` gives each original ``(height, width)``."""
        cfg = self.config.processor.anyres
        if self.packer is not None:
            return self.packed_features(pixel_values, image_sizes, **extra)
        if cfg is None:
            if pixel_values.dim() == 5:
                pixel_values, extra = drop_padding_views(pixel_values, extra)
            if pixel_values.dim() != 4:
                raise SampleError(f"pixel_values must be [N_img, 3, H, W], got {list(pixel_values.shape)}")
            return self.encode_images(pixel_values, **extra).flatten(0, 1)
        if image_sizes is None:
            raise SampleError("an AnyRes model needs image_sizes ([N_img, 2] original heights and widths)")
        sizes = [tuple(s) for s in image_sizes.tolist()]
        tiled = tiled_images(len(sizes), batch_num_images, cfg)
        tile = self.config.processor.image_size
        counts = [
            1 + math.prod(anyres.grid_shape(s, cfg.grid_pinpoints, tile)) if t else 1
            for s, t in zip(sizes, tiled)
        ]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes) or max(counts) > pixel_values.shape[1]:
                raise SampleError(
                    f"pixel_values {list(pixel_values.shape)} do not hold the views of {len(sizes)} images "
                    f"(up to {max(counts)} views each)"
                )
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        elif pixel_values.shape[0] != sum(counts):
            raise SampleError(
                f"pixel_values has {pixel_values.shape[0]} views, the image sizes need {sum(counts)}"
            )
        feats = self.encode_images(pixel_values, **extra).split(counts)
        return torch.cat(
            [anyres.pack_features(f, s, cfg, tile, self.image_newline) for f, s in zip(feats, sizes)]
        )

    def packed_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, **extra: torch.Tensor | None
    ) -> torch.Tensor:
        """Feature rows ``[N_rows, D_lm]`` with a packing tiler: every image's views ``[sum P, 3, S, S]``
        (in order) through the tower, each image's packed by ``self.packer`` from its ``image_sizes``
        ``[N_img, 2]`` (height, width), then the connector row by row."""
        if image_sizes is None:
            raise SampleError(
                f"tiler {self.config.processor.tiler!r} needs image_sizes ([N_img, 2] heights and widths)"
            )
        if pixel_values.dim() != 4:
            raise SampleError(f"pixel_values must be [N_views, 3, H, W], got {list(pixel_values.shape)}")
        sizes = [tuple(s) for s in image_sizes.tolist()]
        counts = [self.tiler.num_views(s, self.config.processor.image_size) for s in sizes]
        if pixel_values.shape[0] != sum(counts):
            raise SampleError(
                f"pixel_values has {pixel_values.shape[0]} views, the image sizes need {sum(counts)}"
            )
        feats = self.tower_features(pixel_values, **extra).split(counts)
        rows = torch.cat([self.packer(f, s) for f, s in zip(feats, sizes)])
        return self.connector(rows[None], **_inputs_of(self.connector, extra))[0]

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Feature rows ``[N_rows, D_lm]`` of videos ``[N_vid, F, 3, S, S]``: frames encoded as images, pooled in
        2D before or after the projector, newlines placed per ``processor.video.newline``."""
        cfg = self.config.processor.video
        if cfg is None:
            raise SampleError("this model takes no videos (its processor has no video settings)")
        if pixel_values_videos.dim() != 5:
            raise SampleError(
                f"pixel_values_videos must be [N_vid, F, 3, H, W], got {list(pixel_values_videos.shape)}"
            )
        n, f = pixel_values_videos.shape[:2]
        x = self.vision(pixel_values_videos.flatten(0, 1))
        x = (
            self.connector(video.pool(x, cfg))
            if cfg.pool_position == "before"
            else video.pool(self.connector(x), cfg)
        )
        x = x.unflatten(0, (n, f))
        return torch.cat([video.add_newlines(v, cfg, self.image_newline) for v in x])

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        **extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings with the visual features spliced into the image and video placeholder positions.
        ``extra``: inputs of parts that take more than pixels (``EXTRA_VISUAL_INPUTS``)."""
        unknown = sorted(
            k
            for k, v in extra.items()
            if k not in EXTRA_VISUAL_INPUTS and k not in RECOMPUTED_INPUTS and v is not None
        )
        if unknown:
            raise SampleError(
                f"unexpected model input(s) {unknown}; extra visual inputs: {EXTRA_VISUAL_INPUTS}"
            )
        # A gated cross-attention model's <image> is a text token: its images go to the blocks (``fused``).
        image_mask = input_ids == self.config.image_token_id
        if self.gated:
            image_mask, pixel_values = torch.zeros_like(image_mask), None
        video_mask = input_ids == self.config.video_token_id
        # Placeholder ids may lie outside the decoder's vocabulary: look up a valid id, then overwrite.
        embeds = self.language.get_input_embeddings()(input_ids.masked_fill(image_mask | video_mask, 0))
        for pixels, mask, what, token_id in (
            (pixel_values, image_mask, "image", self.config.image_token_id),
            (pixel_values_videos, video_mask, "video", self.config.video_token_id),
        ):
            if pixels is None:
                if mask.any():
                    raise SampleError(
                        f"{int(mask.sum())} {what} placeholder tokens in the input but no "
                        f"{'pixel_values' if what == 'image' else 'pixel_values_videos'}"
                    )
                continue
            pixels = pixels.to(embeds.dtype)
            feats = (
                self.image_features(pixels, image_sizes, batch_num_images, **extra)
                if what == "image"
                else self.video_features(pixels)
            )
            embeds = merge_image_features(embeds, input_ids, feats, token_id, what)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        supervised_logits_only: bool = False,
        **extra: object,
    ) -> CausalLMOutputWithPast:
        """transformers' contract: ``.logits`` ``[B, T, V]`` and, with ``labels``, the mean next-token loss.

        ``supervised_logits_only=True`` (the trainer's setting) computes the LM head only where a label is
        supervised and returns those rows as ``.logits`` ``[N_sup, V]``: the same loss without the ``[B, T, V]``
        logits of every prompt, image and pad position."""
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = self.positions(input_ids, attention_mask)
        extra = {k: v for k, v in extra.items() if k in EXTRA_VISUAL_INPUTS}
        with self.fused(input_ids, pixel_values, **extra):
            inputs_embeds = self.embed(
                input_ids, pixel_values, image_sizes, pixel_values_videos, batch_num_images, **extra
            )
            if (
                labels is not None
                and supervised_logits_only
                and past_key_values is None
                and plain_head(self.language)
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
        """New token ids ``[B, T_new]``; see ``vlmlab.inference.generate.generate``. Takes a processor batch as
        it is (``labels``, meaningless here, are ignored)."""
        from vlmlab.inference.generate import generate

        kwargs.pop("labels", None)
        return generate(self, input_ids, **kwargs)

    # -- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, format: str = "vlmlab") -> None:
        """``format="vlmlab"``: ``config.json`` + ``model.safetensors`` (tied weights stored once).
        ``format="hf"``: a transformers checkpoint its own class loads (a CLIP/SigLIP tower with the
        ``mlp2x_gelu`` connector: ``llava``, or with AnyRes ``llava_next``, ``llava_next_video``, ``llava_onevision``)."""
        if format == "hf":
            from vlmlab.interop.hf import HF_FORMATS, export_hf, hf_model_type

            export_hf(self, path, HF_FORMATS, hf_model_type(self.config))
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


# Inputs beyond pixels that some parts take, by the name transformers' processors give them.
# transformers' media masks (Idefics' ``image_attention_mask``, Mllama's ``cross_attention_mask``): vlmlab computes
# the same from ``input_ids`` (``cross_media``; tests/interop check equality), so a transformers batch can be passed
# as it is and these are not read.
RECOMPUTED_INPUTS = ("image_attention_mask", "cross_attention_mask")
EXTRA_VISUAL_INPUTS = (
    "pixel_attention_mask",
    "qformer_input_ids",
    "qformer_attention_mask",
    "cross_pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
)


def _inputs_of(part: nn.Module, extra: dict) -> dict:
    """The entries of ``extra`` that ``part`` takes (its ``extra_inputs``); a part that takes none gets none."""
    return {k: extra[k] for k in getattr(part, "extra_inputs", ()) if extra.get(k) is not None}


def drop_padding_views(pixel_values: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
    """``[N_img, P, 3, H, W]`` -> ``[N_views, 3, H, W]`` without the all-zero padding views (transformers'
    Idefics rule); per-view extras (``pixel_attention_mask`` ``[N_img, P, H, W]``) keep the same views."""
    flat = pixel_values.flatten(0, 1)
    real = (flat != 0).flatten(1).any(1)
    if not real.any():  # all padding: keep one view, as transformers does
        real[0] = True
    out = dict(extra)
    mask = extra.get("pixel_attention_mask")
    if mask is not None:
        out["pixel_attention_mask"] = mask.flatten(0, 1)[real]
    return flat[real], out


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the storage they share (most groups have one name)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(t.data_ptr(), []).append(name)
    return list(groups.values())


def tiled_images(n_images: int, batch_num_images, cfg) -> list[bool]:
    """Which images are tiled: all, unless ``cfg.tile_multi_image`` is off (OneVision), in which case only the
    images alone in their sample (``batch_num_images`` gives the images per sample; None = one each)."""
    if cfg.tile_multi_image or batch_num_images is None:
        return [True] * n_images
    per_sample = [int(n) for n in batch_num_images]
    if sum(per_sample) != n_images:
        raise SampleError(f"batch_num_images {per_sample} does not add up to {n_images} images")
    return [n == 1 for n in per_sample for _ in range(n)]


def plain_head(language) -> bool:
    """The decoder's logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after the head)."""
    cfg = language.config
    return getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip left padding: 0 at each sample's first real token."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def shared_image_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """CogVLM's position ids (SYSTEMS.md §8): a token takes the next position unless it continues a run of image
    tokens, so every token of one image shares the position of its first and the text after it continues from
    there; padding is skipped as in ``positions_from_mask``."""
    image = input_ids == image_token_id
    continues = image & torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
    advance = attention_mask.bool() & ~continues
    return (advance.long().cumsum(-1) - 1).clamp(min=0)
