"""Cambrian-1's re-aggregation inside the decoder (SYSTEMS.md §20; cambrian-mllm/cambrian
``cambrian/model/language_model/cambrian_llama.py``, ``vision_sampler_layers``), hooked into a pretrained decoder.

After each chosen decoder layer (``fusion.regional.layers``; Cambrian-1-8B: 0, 3, ..., 27), the hidden states at
the image positions that stand for the connector's G x G queries (not its row newlines) are the queries of one
more aggregation layer (``connectors/sva.py`` ``SVALayer``, query width = the LLM's): each reads its own cell's
region of every tower of its own image, with that image's global context, and its hidden state becomes
``h + MLP(...)`` (the layer's own residual). Every other position keeps the decoder layer's output.

[Contract] The decoder's code and state-dict keys are untouched. The layers live in the model (``regional_attn``,
keyed by decoder layer index); a forward hook on decoder layer ``i`` applies ``regional_attn.{i}`` to the layer's
output, and a pre-hook on the decoder picks the query positions of each forward. Both read their state from an
attribute (no closures), so a ``copy.deepcopy`` of the model runs its own copies.

[Contract] Positions. ``regional(decoder, connector, features, input_ids, image_token_id)`` records, for sequence
positions ``0 .. L-1`` of ``input_ids``, which cell of which image each position is a query for (``where``
``[B, L]``, -1: none; the n-th image's placeholder run, in the text's order, is the n-th image's tokens as the
connector lays them out). A forward that sees ``T`` tokens after ``P`` cached ones updates the query positions
among ``P .. P + T - 1``; generated tokens are never queries. So a prefill with a KV cache and an uncached forward
over the prompt and the generated tokens update the same positions from the same inputs: cached = uncached.
Each layer's keys and values are computed from the regions once per ``regional`` block. Outside a block, without
images, or on text-only input, the decoder is the base LLM exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.fusion.hooks import forward_span, hooked_state


class RegionalState:
    """The visual inputs of one ``regional`` block, shared by every hooked layer of one decoder (not in the state
    dict)."""

    def __init__(self) -> None:
        self.regions: list[torch.Tensor] | None = None  # per tower [N * C, r_i², dim], C cells per image
        self.context: torch.Tensor | None = None  # [N * C, dim]
        self.where: torch.Tensor | None = None  # [B, L] long: image * C + cell, or -1
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer id -> keys, values
        self.rows: tuple[torch.Tensor, ...] | None = None  # this forward's (b, t, cell) of its queries

    def select(self, offset: int, length: int, batch: int) -> None:
        self.rows = None
        if self.where is None:
            return
        if self.where.shape[0] != batch:
            raise SampleError(
                f"regional positions have batch {self.where.shape[0]} but the decoder forward has {batch}"
            )
        where = self.where[:, offset : offset + length]
        b, t = (where >= 0).nonzero(as_tuple=True)
        if b.numel():
            self.rows = (b, t, where[b, t])

    def keys_values(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv.get(id(layer))
        if kv is None:
            kv = self.kv[id(layer)] = layer.kv(self.regions)
        return kv


def _state_of(decoder: nn.Module) -> RegionalState:
    return hooked_state(decoder, "_vlmlab_regional", "apply_regional")


def _select_rows(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    x, offset = forward_span(args, kwargs)
    _state_of(decoder).select(offset, x.shape[1], x.shape[0])


def _regional_hook(layer: nn.Module, args: tuple, kwargs: dict, output):
    block, state = layer._vlmlab_regional
    if state.rows is None:
        return None
    h = output[0] if isinstance(output, tuple) else output
    b, t, cells = state.rows
    k, v = state.keys_values(block)
    context = state.context[cells]
    new = block(h[b, t].to(context.dtype), context, (k[cells], v[cells]))
    h = h.index_put((b, t), new.to(h.dtype))
    return (h, *output[1:]) if isinstance(output, tuple) else h


def apply_regional(decoder: nn.Module, layers: dict[int, nn.Module]) -> None:
    """Hook ``layers`` (decoder layer index -> aggregation layer) into ``decoder`` (a transformers base model whose
    ``layers`` return the hidden states, or a tuple starting with them)."""
    if getattr(decoder, "_vlmlab_regional", None) is not None:
        raise ConfigError(f"{type(decoder).__name__} already has regional re-aggregation")
    state = RegionalState()
    handles = [decoder.register_forward_pre_hook(_select_rows, with_kwargs=True)]
    for i, block in layers.items():
        if not 0 <= i < len(decoder.layers):
            raise ConfigError(
                f"fusion.regional.layers: {i} is not a layer of a {len(decoder.layers)}-layer decoder"
            )
        layer = decoder.layers[i]
        layer._vlmlab_regional = (block, state)  # a tuple: the block is not registered under the decoder
        handles.append(layer.register_forward_hook(_regional_hook, with_kwargs=True))
    decoder._vlmlab_regional = (state, handles)


def build_regional(decoder: nn.Module, connector: nn.Module, config) -> nn.ModuleDict:
    """The aggregation layers of ``config.fusion.regional`` (a ``ModelConfig``), built by ``connector`` at the
    decoder's width and hooked into ``decoder``; returned to be held (and trained) by the model."""
    layers = config.fusion.regional.layers
    if not hasattr(connector, "regional_inputs"):
        raise ConfigError(
            f"fusion.regional: connector {config.connector.name!r} has no regions to re-read (use 'sva')"
        )
    if not layers:
        raise ConfigError("fusion.regional.layers: no decoder layer given")
    proc, cross = config.processor, config.fusion.cross
    if proc.anyres or proc.tiler or proc.video or (cross is not None and cross.kind == "gated"):
        raise ConfigError(
            "fusion.regional: one view per image, as tokens (no anyres, tiler, video or gated cross-attention)"
        )
    d = decoder.config.hidden_size
    blocks = {i: connector.decoder_layer(d) for i in layers}
    apply_regional(decoder, blocks)
    return nn.ModuleDict({str(i): b for i, b in blocks.items()})


def query_positions(
    input_ids: torch.Tensor, image_token_id: int, cells: torch.Tensor, n_images: int
) -> torch.Tensor:
    """``[B, L]``: ``image * C + cell`` at each image placeholder that is the query of ``cell`` (C = cells per
    image), -1 elsewhere. ``cells`` ``[n_tok]`` gives each of an image's placeholders its cell (-1: none)."""
    is_img = input_ids == image_token_id
    n_tok, n_cells = cells.numel(), int(cells.max()) + 1
    slots = int(is_img.sum())
    if slots != n_images * n_tok:
        raise SampleError(
            f"image features and image tokens do not match: {slots} placeholder tokens in the text but "
            f"{n_images} images of {n_tok} tokens"
        )
    k = torch.arange(slots, device=input_ids.device)
    cell = cells.to(input_ids.device)[k % n_tok]
    where = torch.full_like(input_ids, -1)
    where[is_img] = torch.where(cell >= 0, (k // n_tok) * n_cells + cell, -1)  # row-major: image by image
    return where


@contextlib.contextmanager
def regional(
    decoder: nn.Module,
    connector: nn.Module,
    features: list[torch.Tensor] | None,
    input_ids: torch.Tensor,
    image_token_id: int,
) -> Iterator[RegionalState]:
    """Run every forward of ``decoder`` inside the block with the towers' ``features`` (``[N, n_i, D_i]`` each,
    the images of ``input_ids`` in order) re-read at the query positions of ``input_ids``. ``features=None``: the
    base decoder."""
    state = _state_of(decoder)
    saved = (state.regions, state.context, state.where, state.kv)
    if features is None:
        state.regions = state.context = state.where = None
    else:
        state.regions, state.context = connector.regional_inputs(features)
        state.where = query_positions(
            input_ids, image_token_id, connector.token_cells(), features[0].shape[0]
        )
    state.kv = {}
    try:
        yield state
    finally:
        state.regions, state.context, state.where, state.kv = saved
        state.rows = None


__all__ = ["RegionalState", "apply_regional", "build_regional", "query_positions", "regional"]
