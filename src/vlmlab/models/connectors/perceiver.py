"""Perceiver resamplers: a fixed number of learned latents cross-attend to any number of visual tokens (SYSTEMS.md
§0 ``QueryResampler``, §21). (Idefics3's connector is a pixel shuffle: ``pixel_shuffle.py``.)

One ``PerceiverResampler`` covers the three references:

- Flamingo (mlfoundations/open_flamingo ``src/helpers.py`` ``PerceiverResampler``): 64 latents (randn), depth 6,
  8 heads x 64, LayerNorm on media and latents, K/V = concat(media, latents), a residual FF (LN, Linear x4, GELU,
  Linear, no biases), a final LN, learned ``media_time_embs`` [T, 1, D] and ``frame_embs`` [F, D] for media
  ``[B, T, F, v, D]``; the output is ``[B, T, n_latents, D]``.
- Idefics2 (transformers ``Idefics2PerceiverResampler``): RMSNorm, grouped key/value heads, a SwiGLU MLP x4,
  latents initialised to ones, no time embeddings, and a mask over padded patches.
- Idefics (v1, transformers ``IdeficsPerceiverResampler``): Flamingo's, with a ReLU FF (``ff="relu"``) and
  optionally a LayerNorm on each query and key head (``qk_norm``, its ``qk_layer_norms_perceiver``).

Connectors built on it (``CONNECTORS``): ``perceiver`` (Flamingo's resampler at the tower's width, then a Linear to the
LM width, or none with ``project=False``: Idefics) and ``idefics2_perceiver`` (Idefics2's ``modality_projection``
SwiGLU MLP to the LM width, then the resampler).
Parameter names follow transformers' Idefics2 modules, so checkpoints map by whole prefixes.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.layers import NORMS, CrossAttention, GeluFF, SwiGLU, norm_layer

FFS = ("gelu", "relu", "swiglu")


class PerceiverAttention(CrossAttention):
    """Latents (queries) attend to K/V = concat(media, latents); ``kv_heads`` < ``heads`` shares K/V heads (GQA);
    ``qk_norm`` normalises each query and key head with a ``norm`` layer."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, kv_heads: int, qk_norm=False, norm="rmsnorm", eps=1e-6
    ):
        super().__init__(dim, dim, heads, dim_head, kv_heads, qk_norm, eps, qk_norm_kind=norm)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``latents`` [B, n, D], ``media`` [B, N, D], ``mask`` [B, N] (True = attend) or None -> [B, n, D]."""
        b, n, _ = latents.shape
        attn_mask = None
        if mask is not None:  # the latents themselves are always visible
            full = torch.cat([mask.bool(), mask.new_ones(b, n, dtype=torch.bool)], dim=1)
            attn_mask = full[:, None, None, :]
        return super().forward(latents, self.kv(torch.cat([media, latents], dim=1)), attn_mask)


class PerceiverLayer(nn.Module):
    def __init__(self, dim, heads, dim_head, kv_heads, ff, ff_mult, norm, eps, act, qk_norm):
        super().__init__()
        self.input_latents_norm = norm_layer(norm, dim, eps)
        self.input_context_norm = norm_layer(norm, dim, eps)
        self.self_attn = PerceiverAttention(dim, heads, dim_head, kv_heads, qk_norm, norm, eps)
        self.post_attention_layernorm = norm_layer(norm, dim, eps)
        self.mlp = (
            SwiGLU(dim, dim * ff_mult, dim, act) if ff == "swiglu" else GeluFF(dim, dim * ff_mult, act=ff)
        )

    def forward(self, latents, media, mask):
        latents = latents + self.self_attn(
            self.input_latents_norm(latents), self.input_context_norm(media), mask
        )
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """``[B, N, D]`` -> ``[B, n_latents, D]``, or media ``[B, T, F, v, D]`` -> ``[B, T, n_latents, D]``.

    Defaults are Flamingo's (randn latents, LayerNorm, GELU FF x4, time embeddings when ``max_num_media`` is set);
    ``norm="rmsnorm", ff="swiglu", latents_init="ones", kv_heads=...`` is Idefics2's resampler, ``ff="relu"`` (and
    ``qk_norm``: per-head query/key norms of the ``norm`` kind) Idefics' (v1). ``mask``
    ([B, N] or [B, T, F*v], True = a real patch) hides padded patches from the latents."""

    def __init__(
        self,
        dim: int,
        n_latents: int = 64,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        kv_heads: int | None = None,
        ff: str = "gelu",
        ff_mult: int = 4,
        norm: str = "layernorm",
        eps: float = 1e-5,
        act: str = "silu",
        latents_init: str = "randn",
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"perceiver: norm {norm!r} is not one of {list(NORMS)}")
        if ff not in FFS:
            raise ConfigError(f"perceiver: ff {ff!r} is not one of {list(FFS)}")
        if latents_init not in ("randn", "ones"):
            raise ConfigError(f"perceiver: latents_init {latents_init!r} is not one of ['randn', 'ones']")
        init = torch.randn if latents_init == "randn" else torch.ones
        self.n_latents = n_latents
        self.latents = nn.Parameter(init(n_latents, dim))
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, heads, dim_head, kv_heads or heads, ff, ff_mult, norm, eps, act, qk_norm)
            for _ in range(depth)
        )
        self.norm = norm_layer(norm, dim, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:
            return self._resample(x, mask)
        if x.dim() != 5:
            raise SampleError(f"perceiver: media must be [B, N, D] or [B, T, F, v, D], got {list(x.shape)}")
        b, t, f, v, d = x.shape
        if self.frame_embs is not None:
            if f > self.frame_embs.shape[0]:
                raise SampleError(f"perceiver: {f} frames, at most {self.frame_embs.shape[0]}")
            x = x + self.frame_embs[:f, None, :]  # one embedding per frame, shared by its v tokens
        x = x.reshape(b, t, f * v, d)
        if self.media_time_embs is not None:
            if t > self.media_time_embs.shape[0]:
                raise SampleError(f"perceiver: {t} media, at most {self.media_time_embs.shape[0]}")
            x = x + self.media_time_embs[:t]
        if mask is not None:
            mask = mask.reshape(b * t, f * v)
        return self._resample(x.reshape(b * t, f * v, d), mask).unflatten(0, (b, t))

    def _resample(self, media: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1).to(media.dtype)
        for layer in self.layers:
            latents = layer(latents, media, mask)
        return self.norm(latents)


def patch_mask(pixel_attention_mask: torch.Tensor, patch_size: int, rule: str = "all") -> torch.Tensor:
    """``[N, H, W]`` pixel mask -> ``[N, H/p, W/p]`` patch mask, as transformers computes it: Idefics2 keeps a patch
    whose pixels are ``all`` real, Idefics3 one with ``any`` real pixel (a partial last row/column is dropped)."""
    if pixel_attention_mask.dim() != 3:
        raise SampleError(
            f"pixel_attention_mask must be [N_img, H, W], got {list(pixel_attention_mask.shape)}"
        )
    sub = pixel_attention_mask.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)
    count = sub.sum(dim=(-1, -2))
    return count == patch_size * patch_size if rule == "all" else count > 0


class FlamingoPerceiver(nn.Module):
    """``perceiver``: Flamingo's resampler at the tower's width, then a Linear to the LM width.
    ``[B, N, D_vis] -> [B, n_latents, D_lm]`` (one media, one frame per view). ``project=False`` (Idefics: the gated
    blocks read the resampler's output at the tower's width) has no Linear, and ``out_dim`` must be ``in_dim``."""

    def __init__(self, in_dim: int, out_dim: int, project: bool = True, **params):
        super().__init__()
        if not project and out_dim != in_dim:
            raise ConfigError(
                f"perceiver: project=False outputs the tower's width {in_dim}, but {out_dim} is asked "
                f"(fusion.cross.media_dim)"
            )
        self.perceiver = PerceiverResampler(in_dim, **params)
        self.proj = nn.Linear(in_dim, out_dim) if project else None

    def num_tokens(self, n_vis: int) -> int:
        return self.perceiver.n_latents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perceiver.media_time_embs is not None:  # a view is media #0, frame #0
            x = self.perceiver(x[:, None, None]).squeeze(1)
        else:
            x = self.perceiver(x)
        return x if self.proj is None else self.proj(x)


class Idefics2Perceiver(nn.Module):
    """``idefics2_perceiver`` (transformers ``Idefics2Connector``): ``modality_projection`` (SwiGLU MLP
    ``D_vis -> intermediate_size -> D_lm``) then Idefics2's resampler at the LM width. With
    ``pixel_attention_mask`` (``[N, H, W]``) padded patches (not all pixels real) are hidden from the latents."""

    extra_inputs = ("pixel_attention_mask",)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        patch_size: int = 14,
        n_latents: int = 64,
        depth: int = 3,
        heads: int = 16,
        dim_head: int = 96,
        kv_heads: int = 4,
        resampler_act: str = "silu",
        rms_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.modality_projection = SwiGLU(in_dim, intermediate_size or 4 * out_dim, out_dim, hidden_act)
        self.perceiver = PerceiverResampler(
            out_dim,
            n_latents=n_latents,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            kv_heads=kv_heads,
            ff="swiglu",
            norm="rmsnorm",
            eps=rms_norm_eps,
            act=resampler_act,
            latents_init="ones",
        )

    def num_tokens(self, n_vis: int) -> int:
        return self.perceiver.n_latents

    def forward(self, x: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if pixel_attention_mask is not None:
            mask = patch_mask(pixel_attention_mask, self.patch_size, "all").flatten(1)
            if mask.shape != x.shape[:2]:
                raise SampleError(
                    f"pixel_attention_mask gives {list(mask.shape)} patches, the features are {list(x.shape[:2])}"
                )
        return self.perceiver(self.modality_projection(x), mask)
