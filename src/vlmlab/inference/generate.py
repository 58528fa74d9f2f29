"""Autoregressive generation for any ``VisionLanguageModel``: KV cache, greedy and sampling, batched with left
padding.

Works on token ids only (no tokenizer): stop strings are checked by a caller-supplied ``stop`` callback, which
the processor builds (``Processor.stop_checker``). ``use_cache=False`` re-runs the whole sequence every step; it
exists so tests can prove the cached path gives the same tokens.

Decoding a token reads every weight once, so its speed is memory traffic (measured by ``vlmlab bench``, see
docs/bench.md). Three things keep that traffic down: the KV cache lives in buffers allocated once for the whole
generation (a growing cache copies all of it for every token and layer), the LM head runs only on the last
position (at prefill too), and the head is computed as ``W @ h.T``, which streams its large ``[V, D]`` weight once.
Llama-family decoders (Llama, Qwen2, Mistral) then decode each new token with vlmlab's own step over that cache
(``fast_decode.py``) instead of transformers' layers, whose per-operation overhead is a large share of a step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from vlmlab.inference.fast_decode import fast_decoder, linear
from vlmlab.models.language import cache_kwargs
from vlmlab.models.vlm import plain_head, positions_from_mask


def sample_next(
    logits: torch.Tensor,  # [B, V]
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy argmax, or a sample from the temperature-scaled nucleus (top-p) distribution. Returns [B]."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` whose keys and values live in buffers of ``max_len`` positions, allocated
    at prefill: appending a token writes one row instead of concatenating (copying) the whole cache."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buf = key_states.new_empty(B, H, self.max_len, key_states.shape[-1])
        self.value_buf = value_states.new_empty(B, H, self.max_len, value_states.shape[-1])
        self.keys, self.values = self.key_buf[:, :, :0], self.value_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self.key_buf[:, :, start:end] = key_states
        self.value_buf[:, :, start:end] = value_states
        # Views of the filled part: the same values and shapes a DynamicLayer returns.
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values


def kv_cache(language, max_len: int) -> DynamicCache:
    """The decoder's cache for ``max_len`` positions: preallocated when every layer attends to every position it
    has seen, i.e. plain full attention or a sliding window of at least ``max_len`` (Mistral's 4096 on a shorter
    generation: nothing ever leaves it). A window the generation reaches, and other layer kinds, keep
    transformers' own."""
    cache = DynamicCache(config=language.config)

    def full(layer) -> bool:
        return type(layer) is DynamicLayer or (
            type(layer) is DynamicSlidingWindowLayer and layer.sliding_window >= max_len
        )

    if cache.layers and all(full(layer) for layer in cache.layers):
        cache.layers = [PreallocatedLayer(max_len) for _ in cache.layers]
    return cache


def last_logits(language, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` last hidden states -> ``[B, V]`` logits, through ``fast_decode.linear``: with B << V, the BLAS
    behind ``nn.Linear`` streams the ``[V, D]`` head at a fraction of the machine's speed on CPU (docs/bench.md).
    Heads with soft-capping or scaling go through the decoder's own forward instead (see ``_decoder_step``)."""
    head = language.get_output_embeddings()
    return linear(head.weight, head.bias, hidden)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """New token ids ``[B, T_new]`` (see ``_generate``). A model with deep fusion (``fused``) runs in its context
    throughout: the prompt's image rows routed to its image weights, the cross-attention blocks reading the
    prompt's visual features (keys and values computed once); the generated tokens are text rows."""
    fused = getattr(model, "fused", None)
    if fused is None:
        return _generate(model, input_ids, *args, **kwargs)
    options = _decoding_options()
    visual = {k: v for k, v in kwargs.items() if k not in options}
    pixels = args[1] if len(args) > 1 else kwargs.get("pixel_values")
    visual.pop("pixel_values", None)
    visual.pop("attention_mask", None)
    with fused(input_ids, pixels, **visual):
        return _generate(model, input_ids, *args, **kwargs)


def _generate(
    model,
    input_ids: torch.Tensor,  # [B, T], left-padded
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    **visual_inputs: torch.Tensor | None,
) -> torch.Tensor:
    """New token ids ``[B, T_new]``; a finished row (EOS or ``stop``) is filled with ``pad_token_id``.

    ``visual_inputs`` are the processor's other model inputs (``image_sizes``, ``pixel_values_videos`` ...),
    passed to ``model.embed`` once, at prefill."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if eos_token_id is None:
        eos_token_id = []
    eos = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device
    )
    B, T = input_ids.shape
    embeds = model.embed(input_ids, pixel_values, **visual_inputs)  # [B, T, D]
    # The mask of the whole generation, written once; step i sees its first T + i columns.
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
    # RoPE positions of the prompt (padding skipped; image tokens per the model's rule), then one per new token.
    positions_of = getattr(model, "positions", None)
    prompt_positions = (
        positions_of(input_ids, attention_mask) if positions_of else positions_from_mask(attention_mask)
    )
    n_real = prompt_positions.max(-1, keepdim=True).values + 1  # [B, 1]: the next token's position
    cache = kv_cache(model.language, T + max_new_tokens) if use_cache else None
    decode = _decoder_step(model.language, cache)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    step_embeds, positions = embeds, prompt_positions
    for i in range(max_new_tokens):
        logits = decode(step_embeds, mask[:, : T + i], positions)  # [B, V]
        nxt = sample_next(logits, do_sample, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        new_tokens.append(nxt)
        if eos.numel():
            done |= torch.isin(nxt, eos)
        if stop is not None:
            seqs = torch.stack(new_tokens, 1).tolist()
            done |= torch.tensor([stop(s) for s in seqs], device=done.device)
        if bool(done.all()):
            break
        tok_embeds = model.language.get_input_embeddings()(nxt[:, None])  # [B, 1, D]
        if use_cache:
            step_embeds, positions = tok_embeds, n_real + i
        else:
            embeds = torch.cat([embeds, tok_embeds], dim=1)
            new_positions = n_real + torch.arange(i + 1, device=n_real.device)  # [B, i + 1]
            step_embeds, positions = embeds, torch.cat([prompt_positions, new_positions], dim=1)
    return torch.stack(new_tokens, 1) if new_tokens else input_ids.new_zeros(B, 0)


def _decoder_step(language, cache) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(embeds [B, t, D], mask [B, T_seen], positions [B, t]) -> [B, V]`` logits of the last position,
    appending to ``cache`` (None: no cache)."""
    kwargs = {"use_cache": cache is not None, **cache_kwargs(language, cache)}
    if plain_head(language):
        decoder = language.get_decoder()
        # Llama-family decoders decode with vlmlab's own step (inference/fast_decode.py) once the prefill,
        # transformers' decoder, has filled the preallocated cache.
        fast = fast_decoder(language, cache)

        def step(embeds, mask, positions):
            if fast is not None and fast.ready(embeds):
                return last_logits(language, fast(embeds, mask, positions))
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)
            return last_logits(language, out.last_hidden_state[:, -1])

        return step

    def step(embeds, mask, positions):
        out = language(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1]

    return step


def _decoding_options() -> set[str]:
    """``_generate``'s keyword-only settings (everything else a caller passes is a visual input)."""
    params = inspect.signature(_generate).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
