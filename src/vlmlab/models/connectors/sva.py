"""Cambrian-1's Spatial Vision Aggregator (SVA; SYSTEMS.md §20; cambrian-mllm/cambrian ``cambrian/model/
vision_sampler.py`` ``VisionTokenSampler`` / ``VisionCrossAttentionLayer``, ``cambrian_arch.py``): a fixed G x G
grid of queries reads several towers at different resolutions, each query only its own region of each tower.

A multi-encoder connector (``multi_encoder = True``, ``models/encoders/multi.py``): ``forward`` takes every tower's
features ``[N, n_i, D_i]`` (square grids) and returns ``[N, G * G (+ G), D_lm]``. Per image:

1. each tower's grid is resized to ``grids[i]`` per side (bilinear, no antialiasing: the reference towers'
   ``interp``, e.g. SigLIP's 27 x 27 to 24 x 24, ConvNeXt's 32 x 32 to 96 x 96; a grid already that size is kept
   as it is), then projected to ``dim`` by Linear -> GELU -> Linear -> LayerNorm (``mm_projector_aux_i``);
2. each grid is cut into G x G regions of ``r_i x r_i`` tokens (``r_i = grids[i] / G``, regions and their tokens
   row-major); a region of more than one token gets a learned embedding per slot, ``[r_i², dim]``, the same for
   every region (``pos_embed_i``, randn as in the reference);
3. the global context is the mean of tower 0's projected tokens (the reference: its first tower, SigLIP);
4. the G * G queries are one learned vector (``vision_query``, randn / sqrt(D_lm)), so before attention they are
   all the same: a query knows its place only through the region it reads. ``depth`` layers (``SVALayer``) each
   compute ``x = proj_in([q ; proj_context(context)])``, ``x = x + Attn(x, regions)`` (``heads`` heads over the
   concatenation of the query's region of every tower; LayerNorm + Linear on the query and on each tower's keys
   and values), ``q = q + MLP(LayerNorm(x))``;
5. Linear -> GELU -> Linear to the LLM width (``mm_projector``) and, with ``newline``, a learned vector after each
   row of G (``image_newline``): G * (G + 1) tokens, whatever the towers' resolutions.

[Contract] Locality: the output of query ``r`` is a function of region ``r`` of every tower's resized grid and of
the global context only. So perturbing tokens outside region ``r`` of any tower but tower 0 leaves it unchanged;
tower 0 reaches it through its region ``r`` and through the mean of all its tokens (``tests/test_sva.py``).

The in-decoder re-aggregation (the reference's ``vision_sampler_layers``) is ``models/fusion/sva.py``: it reads
``regional_inputs`` and runs ``decoder_layer(D_lm)`` layers, one per chosen decoder layer.

Not represented: several query groups (``num_query_group > 1``, unused by the released models) and the attention
masks that hide padding regions (the reference's unpadding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.encoders.multi import grid_side


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU -> Linear without biases (the reference's ``MLP``)."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden, bias=False), nn.GELU(), nn.Linear(d_hidden, d_out, bias=False)
    )


def _normed_linear(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim, bias=False))


class RegionalAttention(nn.Module):
    """Each query row attends to its own keys: queries ``[M, dim]``, keys/values ``[M, heads, S, head_dim]`` built
    from ``M`` rows of regions of every source (the reference's ``MultiKVCrossAttention``)."""

    def __init__(self, dim: int, n_sources: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"sva: dim {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = _normed_linear(dim)
        self.k_proj = nn.ModuleList(_normed_linear(dim) for _ in range(n_sources))
        self.v_proj = nn.ModuleList(_normed_linear(dim) for _ in range(n_sources))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def kv(self, regions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, S_i, dim]`` per source -> keys, values ``[M, heads, sum S_i, head_dim]``."""
        k = torch.cat([p(x) for p, x in zip(self.k_proj, regions)], dim=1)
        v = torch.cat([p(x) for p, x in zip(self.v_proj, regions)], dim=1)
        shape = (k.shape[0], k.shape[1], self.heads, self.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        m = x.shape[0]
        q = self.q_proj(x).view(m, self.heads, 1, self.head_dim)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # [M, heads, 1, head_dim]
        return self.o_proj(out.reshape(m, self.heads * self.head_dim))


class SVALayer(nn.Module):
    """One aggregation layer (the reference's ``VisionCrossAttentionLayer``): queries ``[M, q_dim]`` (the
    connector's, or the decoder's hidden states at image positions), each with its global context ``[M, dim]``
    and its regions ``[M, r_i², dim]`` of every tower -> ``[M, q_dim]``."""

    def __init__(self, q_dim: int, dim: int, sides: list[int], heads: int):
        super().__init__()
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(q_dim + dim, dim, bias=False)
        self.attn = RegionalAttention(dim, len(sides), heads)
        self.norm = nn.LayerNorm(dim)
        self.proj_out = _mlp(dim, dim, q_dim)
        # A learned embedding per slot of a region larger than one token, shared by every region.
        self.pos_embed = nn.ParameterDict(
            {str(i): nn.Parameter(torch.randn(r * r, dim)) for i, r in enumerate(sides) if r > 1}
        )

    def kv(self, regions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the regions (slot embeddings added): computed once per image set."""
        pos = self.pos_embed
        return self.attn.kv(
            [x + pos[str(i)].to(x.dtype) if str(i) in pos else x for i, x in enumerate(regions)]
        )

    def forward(
        self, q: torch.Tensor, context: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = self.proj_in(torch.cat([q, self.proj_context(context)], dim=-1))
        x = x + self.attn(x, kv)
        return q + self.proj_out(self.norm(x))


def resize_side(x: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, s*s, D]`` -> ``[N, side*side, D]``: bilinear in float32 without antialiasing, as the reference's
    towers interpolate (``encoders/multi.py``'s ``resize_grid`` antialiases when shrinking); kept as is at ``side``."""
    n, t, d = x.shape
    s = grid_side(t, "sva: a tower's features")
    if s == side:
        return x
    grid = x.transpose(1, 2).reshape(n, d, s, s).float()
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(x.dtype)


class SpatialVisionAggregator(nn.Module):
    """params: ``grids`` (each tower's grid side after resizing, a multiple of ``grid``, default ``grid``; the reference's
    ``vision_tower_aux_token_len_list`` as sides), ``grid`` (G: G * G queries; Cambrian-1: 24), ``dim`` (the
    aggregation width, ``vision_hidden_size``: 1024), ``depth`` (``connector_depth``: 3), ``heads`` (16),
    ``newline`` (a learned token after each row of queries)."""

    multi_encoder = True

    def __init__(
        self,
        in_dim: list[int],
        out_dim: int,
        grids: list[int] | None = None,
        grid: int = 24,
        dim: int = 1024,
        depth: int = 3,
        heads: int = 16,
        newline: bool = True,
    ):
        super().__init__()
        grids = grids or [grid] * len(in_dim)  # default: every tower resized to the query grid (regions of 1)
        if len(grids) != len(in_dim):
            raise ConfigError(f"connector.params.grids: {len(grids)} grid sides for {len(in_dim)} towers")
        bad = [g for g in grids if g < grid or g % grid]
        if bad:
            raise ConfigError(f"connector.params.grids: {bad} are not multiples of grid {grid}")
        self.grid, self.grids, self.dim, self.heads = grid, list(grids), dim, heads
        self.sides = [g // grid for g in grids]
        self.aux_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
            for d in in_dim
        )
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(out_dim))
        self.layers = nn.ModuleList(SVALayer(dim, dim, self.sides, heads) for _ in range(depth))
        self.projector = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim)) if newline else None

    def num_tokens(self, n_vis: list[int]) -> int:
        for i, n in enumerate(n_vis):
            grid_side(n, f"sva: tower {i}")
        return self.grid * (self.grid + int(self.newline is not None))

    def token_cells(self) -> torch.Tensor:
        """``[num_tokens]``: the query cell (row-major, ``0 .. G*G - 1``) each output token stands for; -1 for
        the row newlines."""
        cells = torch.arange(self.grid * self.grid).view(self.grid, self.grid)
        if self.newline is not None:
            cells = torch.cat([cells, cells.new_full((self.grid, 1), -1)], dim=1)
        return cells.flatten()

    def regional_inputs(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Towers' ``[N, n_i, D_i]`` -> the regions ``[N * G*G, r_i², dim]`` of every tower (image by image, cell
        by cell) and each cell's global context ``[N * G*G, dim]``."""
        if len(features) != len(self.aux_proj):
            raise SampleError(f"sva: {len(features)} towers' features for {len(self.aux_proj)} towers")
        g, regions, context = self.grid, [], None
        for i, (f, proj, side, r) in enumerate(zip(features, self.aux_proj, self.grids, self.sides)):
            x = proj(resize_side(f, side))  # [N, side², dim]
            if i == 0:
                context = x.mean(dim=1)
            n = x.shape[0]
            x = x.view(n, g, r, g, r, -1).permute(0, 1, 3, 2, 4, 5)  # [N, G, G, r, r, dim]
            regions.append(x.reshape(n * g * g, r * r, -1))
        return regions, context.repeat_interleave(g * g, dim=0)

    def sample(self, regions: list[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        """The queries through the layers, projected to the LLM width: ``[N, G * G (+ G), D_lm]``."""
        g = self.grid
        q = self.query.to(context.dtype).expand(context.shape[0], -1)
        for layer in self.layers:
            q = layer(q, context, layer.kv(regions))
        x = self.projector(q).unflatten(0, (-1, g, g))  # [N, G, G, D_lm]
        if self.newline is not None:
            x = torch.cat([x, self.newline.to(x.dtype).expand(x.shape[0], g, 1, -1)], dim=2)
        return x.flatten(1, 2)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.sample(*self.regional_inputs(features))

    def decoder_layer(self, q_dim: int) -> SVALayer:
        """One aggregation layer for queries of width ``q_dim`` (the decoder's hidden states) over this
        connector's regions: the reference's ``vision_sampler_layers`` entries."""
        return SVALayer(q_dim, self.dim, self.sides, self.heads)
