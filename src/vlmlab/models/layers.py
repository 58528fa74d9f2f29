"""Layers several parts share: norms, feed-forwards and cross-attention (queries from one sequence, keys and
values from another). Perceiver latents, Q-Former-free resamplers and the decoder's cross-attention blocks
(``fusion/cross.py``) are built from these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vlmlab.errors import ConfigError

NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """T5/Llama RMSNorm (transformers ``Idefics2RMSNorm``): statistics in float32, weight only."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def norm_layer(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)


class SwiGLU(nn.Module):
    """``down(act(gate(x)) * up(x))``, no biases (transformers ``Idefics2MLP``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out_dim, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeluFF(nn.Module):
    """Flamingo's FF after its LayerNorm: Linear(D, 4D), GELU, Linear(4D, D), no biases. ``act`` replaces the
    GELU (Idefics' perceiver: ``relu``)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Queries from the decoder's hidden states ``[B, T, D]``, keys/values from media ``[B, S, D_media]``.
    ``heads * head_dim`` is the inner width (CogAgent: 32 x 32 = 1024 for a 4096-wide LLM); ``kv_heads`` < ``heads``
    shares K/V heads (GQA, Mllama); ``qk_norm`` normalises each query and key head, with an RMSNorm (Mllama,
    Idefics' gated blocks) or, ``qk_norm_kind="layernorm"``, a LayerNorm (Idefics' perceiver)."""

    def __init__(
        self,
        dim,
        media_dim,
        heads,
        head_dim,
        kv_heads=None,
        qk_norm=False,
        eps=1e-6,
        bias=False,
        qk_norm_kind="rmsnorm",
    ):
        super().__init__()
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise ConfigError(f"cross-attention: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(media_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(media_dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.q_norm = norm_layer(qk_norm_kind, head_dim, eps) if qk_norm else None
        self.k_norm = norm_layer(qk_norm_kind, head_dim, eps) if qk_norm else None

    def kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S, D_media]`` -> keys, values ``[B, heads, S, head_dim]`` (computed once per media)."""
        b, s, _ = media.shape
        k = self.k_proj(media).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        groups = self.heads // self.kv_heads
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None):
        """``x`` [B, T, D], ``bias`` [B, 1, T, S] additive (0 = attend) or None -> [B, T, D]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
