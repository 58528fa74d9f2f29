"""Per-token projectors ``[B, N, D_vis] -> [B, N, D_lm]``.

- ``linear`` (LLaVA, Liu et al. 2023) and ``mlp{k}x_gelu`` (LLaVA-1.5, Liu et al. 2023b): Linear, then (GELU,
  Linear) x (k - 1). Reference: haotian-liu/LLaVA ``llava/model/multimodal_projector/builder.py``; transformers'
  ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``) is the same module for k = 2.
- ``glu`` (CogVLM, SYSTEMS.md §8; remote ``THUDM/cogvlm-chat-hf`` ``visual.py`` ``GLU``): Linear(D_vis -> D_lm, no
  bias), LayerNorm, GELU, then a SwiGLU ``D_lm -> inner -> D_lm`` (no biases).
- ``identity``: no projection (Idefics without its resampler).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.models.layers import SwiGLU


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def num_tokens(self, n_vis: int) -> int:
        return n_vis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def linear(in_dim: int, out_dim: int) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth=1)


def mlp2x_gelu(in_dim: int, out_dim: int) -> MLPProjector:
    return MLPProjector(in_dim, out_dim, depth=2)


class GLUProjector(nn.Module):
    """CogVLM's adapter: ``SwiGLU(GELU(LN(W x)))``; names follow the remote code's ``linear_proj``, ``norm1``."""

    def __init__(self, in_dim: int, out_dim: int, inner: int | None = None):
        super().__init__()
        self.linear_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.norm1 = nn.LayerNorm(out_dim)
        self.mlp = SwiGLU(out_dim, inner or 4 * out_dim, out_dim)

    def num_tokens(self, n_vis: int) -> int:
        return n_vis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(nn.functional.gelu(self.norm1(self.linear_proj(x))))


class Identity(nn.Module):
    """``identity``: the tower's features as they are, ``out_dim == in_dim`` (Idefics without its resampler: the
    gated cross-attention blocks read the tower's output)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim != in_dim:
            raise ConfigError(f"identity connector: the output width {out_dim} must be the tower's {in_dim}")

    def num_tokens(self, n_vis: int) -> int:
        return n_vis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
