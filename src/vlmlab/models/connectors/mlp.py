"""LLaVA's projectors: ``linear`` (LLaVA, Liu et al. 2023) and ``mlp{k}x_gelu`` (LLaVA-1.5, Liu et al. 2023b).

``[B, N, D_vis] -> [B, N, D_lm]``: Linear, then (GELU, Linear) x (k - 1). Reference:
haotian-liu/LLaVA ``llava/model/multimodal_projector/builder.py``; transformers' ``LlavaMultiModalProjector``
(``linear_1``, ``act``, ``linear_2``) is the same module for k = 2.
"""

from __future__ import annotations

import torch
from torch import nn


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
