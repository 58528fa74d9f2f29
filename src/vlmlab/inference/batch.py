"""Continuous batching: sequences join and leave one decoding batch between steps (what the server runs).

``generate`` decodes a fixed batch until its last row finishes; a server cannot wait for that, so here each
request is prefilled alone (its images encoded, its prompt run once) and its KV cache copied into a free row of
the running batch, and a finished or cancelled row leaves at once. One decode step then reads every weight once
for all rows, which is where batching's throughput comes from on any hardware.

Layout: every layer's cache is one ``[B, H, W, d]`` buffer with a shared write column ``t``. Row ``b`` holds its
tokens in columns ``[start_b, t)``; the attention mask marks them, and each row has its own RoPE position (the
count of its tokens), so rows of different lengths decode together exactly as a left-padded batch does. A
joining prompt longer than ``t`` shifts the others right; reaching the buffer's end shifts every row left by the
free columns all rows share. Membership changes copy the cache once; a step copies nothing. The buffers start
narrow and double as rows need more columns, up to the model's context: a decoder with an 8k context but
short requests keeps a cache sized for the requests, not for 8k.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vlmlab.errors import ConfigError
from vlmlab.inference.generate import PreallocatedLayer, _decoder_step, kv_cache


@dataclass
class _Row:
    key: object  # the caller's handle
    start: int  # first cache column of this row
    position: int  # RoPE position of its next token (CogVLM's shared image positions: fewer than its tokens)


MIN_WIDTH = 64  # columns the cache buffers start with


class DecodeBatch:
    """Rows decoded together. ``add`` prefills a prompt and returns its next-token logits; ``step`` feeds one
    token per row and returns the logits of the next; ``remove`` drops a row. ``context`` bounds a row's prompt +
    generated tokens (the model's context)."""

    def __init__(self, model, context: int):
        fusion = getattr(model.config, "fusion", None)
        if fusion is not None and fusion.cross is not None:
            # Every decode step would need each row's own visual features inside one decoder call.
            raise ConfigError(
                "continuous batching does not serve cross-attention models (config.fusion.cross) yet: "
                "use model.generate"
            )
        self.model = model
        self.language = model.language
        self.context = context
        self.width = 0  # the buffers' columns: grown as rows need them, up to context
        self.rows: list[_Row] = []
        self.t = 0  # the shared write column
        self.cache = kv_cache(self.language, context)
        self.layers: list[PreallocatedLayer] | None = (
            self.cache.layers if all(isinstance(x, PreallocatedLayer) for x in self.cache.layers) else None
        )
        if self.layers is None:
            raise ConfigError(
                f"continuous batching needs plain full-attention layers; {type(self.language).__name__} "
                "has others (sliding window or hybrid)"
            )
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        # Built once: the step reads the cache layers' buffers at each call, so growing or reordering them is seen.
        self._decode = _decoder_step(self.language, self.cache)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list:
        return [r.key for r in self.rows]

    @torch.no_grad()
    def add(self, key, input_ids: torch.Tensor, **visual_inputs) -> torch.Tensor:
        """Prefill ``input_ids`` ``[1, P]`` (with its images) alone and join the batch; returns ``[V]`` logits."""
        P = input_ids.shape[1]
        if self.context <= P:
            raise ValueError(f"prompt of {P} tokens does not fit the context of {self.context}")
        pixel_values = visual_inputs.pop("pixel_values", None)
        own = kv_cache(self.language, P)
        mask = torch.ones(1, P, dtype=torch.long)
        positions_of = getattr(self.model, "positions", None)
        positions = positions_of(input_ids, mask) if positions_of else torch.arange(P)[None]
        # Routed layers (CogVLM, XComposer2) see the prompt's image rows at prefill; generated tokens are text rows,
        # which take the base weights outside the context, so the decode steps need nothing per row.
        fused = getattr(self.model, "fused", None)
        with fused(input_ids, pixel_values, **visual_inputs) if fused else contextlib.nullcontext():
            embeds = self.model.embed(input_ids, pixel_values, **visual_inputs)
            logits = _decoder_step(self.language, own)(embeds, mask, positions)
        self._grow(P)
        if self.t < P:  # make room on the left: shift the running rows right (t becomes P <= width)
            self._shift(P - self.t)
        self._append_row(own, P)
        self.rows.append(_Row(key, self.t - P, int(positions.max()) + 1))
        return logits[0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B]`` (one per row, in ``self.rows`` order) -> ``[B, V]`` logits of the next tokens."""
        if self.t >= self.width:  # no column left: drop the columns no row uses, or widen the buffers
            free = min(r.start for r in self.rows)
            if free >= self.width // 4 or (free and self.width >= self.context):
                self._compact()
            else:
                self._grow(self.t + 1)
        B = len(self.rows)
        self.mask[:, self.t] = 1
        positions = torch.tensor([[r.position] for r in self.rows])
        for layer in self.layers:  # the decoder appends at column t
            layer.keys = layer.key_buf[:, :, : self.t]
            layer.values = layer.value_buf[:, :, : self.t]
        embeds = self.language.get_input_embeddings()(tokens.view(B, 1))
        logits = self._decode(embeds, self.mask[:, : self.t + 1], positions)
        self.t += 1
        for r in self.rows:
            r.position += 1
        return logits

    def remove(self, key) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.key != key]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        for layer in self.layers:
            layer.key_buf = layer.key_buf.index_select(0, index)
            layer.value_buf = layer.value_buf.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.t = 0
            self.mask = self.mask[:0]

    def _append_row(self, own, P: int) -> None:
        for layer, src in zip(self.layers, own.layers):
            k, v = src.keys, src.values  # [1, H, P, d]
            if not layer.is_initialized:
                layer.key_buf = k.new_zeros(0, k.shape[1], self.width, k.shape[-1])
                layer.value_buf = v.new_zeros(0, v.shape[1], self.width, v.shape[-1])
                layer.is_initialized, layer.device = True, k.device
            new_k = k.new_zeros(1, *layer.key_buf.shape[1:])
            new_v = v.new_zeros(1, *layer.value_buf.shape[1:])
            new_k[:, :, self.t - P : self.t] = k
            new_v[:, :, self.t - P : self.t] = v
            layer.key_buf = torch.cat([layer.key_buf, new_k])
            layer.value_buf = torch.cat([layer.value_buf, new_v])
        row_mask = torch.zeros(1, self.width, dtype=torch.long)
        row_mask[:, self.t - P : self.t] = 1
        self.mask = torch.cat([self.mask, row_mask])

    def _grow(self, columns: int) -> None:
        """Widen the buffers to hold ``columns`` columns (doubling, at most ``context``)."""
        if columns <= self.width:
            return
        if columns > self.context:
            raise RuntimeError("a row outgrew the batch's context")  # callers cap max_tokens
        width = min(self.context, max(columns, 2 * self.width, MIN_WIDTH))
        for layer in self.layers:
            if layer.is_initialized:
                for name in ("key_buf", "value_buf"):
                    old = getattr(layer, name)
                    new = old.new_zeros(*old.shape[:2], width, old.shape[-1])
                    new[:, :, : self.t] = old[:, :, : self.t]
                    setattr(layer, name, new)
        mask = self.mask.new_zeros(self.mask.shape[0], width)
        mask[:, : self.t] = self.mask[:, : self.t]
        self.mask, self.width = mask, width

    def _shift(self, n: int) -> None:
        """Move every row ``n`` columns right (a longer prompt joins)."""
        if self.rows:
            for layer in self.layers:
                for buf in (layer.key_buf, layer.value_buf):
                    buf[:, :, n : self.t + n] = buf[:, :, : self.t].clone()
            self.mask[:, n : self.t + n] = self.mask[:, : self.t].clone()
            self.mask[:, :n] = 0
            for r in self.rows:
                r.start += n
        self.t += n

    def _compact(self) -> None:
        """Move every row left by the columns no row uses (the buffer's end was reached)."""
        free = min((r.start for r in self.rows), default=self.t)
        for layer in self.layers:
            for buf in (layer.key_buf, layer.value_buf):
                buf[:, :, : self.t - free] = buf[:, :, free : self.t].clone()
        self.mask[:, : self.t - free] = self.mask[:, free : self.t].clone()
        self.mask[:, self.t - free :] = 0
        for r in self.rows:
            r.start -= free
        self.t -= free
