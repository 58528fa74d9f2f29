"""The single-cross-attention query resampler of Qwen-VL and MiniCPM-V (SYSTEMS.md §5, §19).

``[B, N_vis, D_vis] -> [B, Q, D]``: ``Q`` learned queries (trunc-normal 0.02) attend once to the tower's tokens.

- KV path: ``kv_proj`` (Linear ``D_vis -> D``, no bias; the identity when ``D_vis == D``, as in both references),
  then ``ln_kv``. Queries: ``ln_q(query)``.
- **Fixed** 2D sin-cos position embeddings (MAE's ``get_2d_sincos_pos_embed``, a non-trainable buffer ``pos_embed``
  of the ``sqrt(Q) x sqrt(Q)`` query grid) are added to the queries and to the keys; values get no position.
  Keys: the query table bicubic-resized to the tokens' grid (Qwen-VL's ``get_abs_pos``), or with
  ``adaptive=True`` a table recomputed for the actual ``(h, w)`` grid (MiniCPM-V's ``tgt_size``).
- One ``nn.MultiheadAttention`` (heads = D / 128 by default), then ``ln_post`` and ``@ proj`` (``D x D``,
  initialised ``D^-0.5 * randn``).

``qwen_vl_adapter``: 256 queries (Qwen-VL's "position-aware VL adapter"); ``minicpm_resampler``: 64 queries with
adaptive key positions. Neither has a transformers class (both are remote code upstream), so the tests check the
formulas and invariants (tests/test_resampler.py). The position table is a buffer, so ``parameters()`` (and
thus every training stage's optimizer) never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlmlab.errors import ConfigError, SampleError

HEAD_DIM = 128  # both references: heads = D / 128


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[M] -> [M, dim]``: ``sin(pos * w_k)`` then ``cos(pos * w_k)``, ``w_k = 10000^(-k / (dim / 2))``."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int | Sequence[int], device=None) -> torch.Tensor:
    """``[h * w, dim]`` float32 2D sin-cos table of an ``(h, w)`` grid (an int: square), row-major.

    MAE / Qwen-VL / MiniCPM-V's ``get_2d_sincos_pos_embed``: the first half of the channels encodes the column
    (their ``grid[0]`` comes from ``meshgrid(grid_w, grid_h)``), the second half the row."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if dim % 4:
        raise ConfigError(f"2D sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows = torch.arange(h, dtype=torch.float64, device=device)
    cols = torch.arange(w, dtype=torch.float64, device=device)
    col_of, row_of = torch.meshgrid(cols, rows, indexing="xy")  # both [h, w]
    return torch.cat([sincos_1d(dim // 2, col_of), sincos_1d(dim // 2, row_of)], dim=1).float()


def resize_table(table: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Qwen-VL's ``get_abs_pos``: a square ``[s * s, D]`` table bicubic-resized (align_corners=False) to
    ``[h * w, D]``; returned as is when the grid already matches."""
    s = math.isqrt(table.shape[0])
    h, w = grid
    if (h, w) == (s, s):
        return table
    t = table.float().reshape(1, s, s, -1).permute(0, 3, 1, 2)
    t = nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
    return t.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class QueryResampler(nn.Module):
    """``forward(x [B, N, D_vis], tgt_size=None) -> [B, Q, D]``; ``tgt_size`` = the tokens' ``(h, w)`` grid
    (default: square, ``sqrt(N)``), so any grid is accepted (MiniCPM-V passes each slice's patch grid)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 256,
        num_heads: int | None = None,
        adaptive: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ConfigError(f"resampler: num_queries must be a square (a 2D query grid), got {num_queries}")
        heads = num_heads or max(1, out_dim // HEAD_DIM)
        if out_dim % heads:
            raise ConfigError(f"resampler: width {out_dim} is not divisible by {heads} heads")
        self.num_queries, self.grid, self.adaptive = num_queries, side, adaptive
        self.query = nn.Parameter(torch.empty(num_queries, out_dim))
        # Fixed, never trained: a buffer (in the state dict, outside parameters() and every optimizer).
        self.register_buffer("pos_embed", sincos_2d(out_dim, side))
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False) if in_dim != out_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(out_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(out_dim, eps=eps)
        self.ln_post = nn.LayerNorm(out_dim, eps=eps)
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(out_dim, out_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        # Both references: queries and Linear weights trunc-normal(0.02), biases 0, LayerNorms (1, 0).
        nn.init.trunc_normal_(self.query, std=0.02)
        if isinstance(self.kv_proj, nn.Linear):
            nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        nn.init.trunc_normal_(self.attn.out_proj.weight, std=0.02)
        nn.init.zeros_(self.attn.out_proj.bias)

    def num_tokens(self, n_vis: int) -> int:
        if math.isqrt(n_vis) ** 2 != n_vis:
            raise ConfigError(
                f"resampler: the tower's {n_vis} tokens are not a square grid (its key positions are 2D); "
                "a tower with a CLS token needs vision.select_feature='patch'"
            )
        return self.num_queries

    def key_pos(self, tgt_size: Sequence[int]) -> torch.Tensor:
        """``[h * w, D]`` key position table of an ``(h, w)`` token grid."""
        if self.adaptive:
            return sincos_2d(self.pos_embed.shape[1], tuple(tgt_size), self.pos_embed.device)
        return resize_table(self.pos_embed, tgt_size)

    def forward(self, x: torch.Tensor, tgt_size: Sequence[int] | None = None) -> torch.Tensor:
        n = x.shape[1]
        if tgt_size is None:
            side = math.isqrt(n)
            if side * side != n:
                raise SampleError(
                    f"resampler: {n} visual tokens are not a square grid; pass tgt_size=(h, w) "
                    "(a tower with a CLS token needs vision.select_feature='patch')"
                )
            tgt_size = (side, side)
        if tgt_size[0] * tgt_size[1] != n:
            raise SampleError(f"resampler: tgt_size {tuple(tgt_size)} does not hold {n} visual tokens")
        kv = self.ln_kv(self.kv_proj(x))  # [B, N, D]
        q = self.ln_q(self.query)  # [Q, D]
        pos_q = self.pos_embed.to(q.dtype)
        pos_k = self.key_pos(tgt_size).to(kv.dtype)
        query = (q + pos_q).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(query, kv + pos_k, kv, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


def qwen_vl_adapter(
    in_dim: int, out_dim: int, num_queries: int = 256, num_heads: int | None = None
) -> QueryResampler:
    """Qwen-VL's position-aware adapter: 256 queries, key positions = the query table resized (bicubic)."""
    return QueryResampler(in_dim, out_dim, num_queries, num_heads, adaptive=False)


def minicpm_resampler(
    in_dim: int, out_dim: int, num_queries: int = 64, num_heads: int | None = None
) -> QueryResampler:
    """MiniCPM-V 2.0's resampler: 64 queries, key positions recomputed for each slice's grid (``adaptive``)."""
    return QueryResampler(in_dim, out_dim, num_queries, num_heads, adaptive=True)
