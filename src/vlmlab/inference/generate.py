"""Autoregressive generation for any ``VisionLanguageModel``: KV cache, greedy and sampling, batched with left
padding.

Works on token ids only (no tokenizer): stop strings are checked by a caller-supplied ``stop`` callback, which
the processor builds (``Processor.stop_checker``). ``use_cache=False`` re-runs the whole sequence every step; it
exists so tests can prove the cached path gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlmlab.models.language import cache_kwargs, returned_cache
from vlmlab.models.vlm import positions_from_mask


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


@torch.no_grad()
def generate(
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
    B = input_ids.shape[0]
    embeds = model.embed(input_ids, pixel_values, **visual_inputs)  # [B, T, D]
    mask = attention_mask.clone()
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    past = None
    step_embeds = embeds
    for _ in range(max_new_tokens):
        positions = positions_from_mask(mask)
        if use_cache and past is not None:
            positions = positions[:, -step_embeds.shape[1] :]
        out = model.language(
            inputs_embeds=step_embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **cache_kwargs(model.language, past),
        )
        nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_p, generator)
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
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        if use_cache:
            past, step_embeds = returned_cache(out), tok_embeds
        else:
            embeds = torch.cat([embeds, tok_embeds], dim=1)
            step_embeds = embeds
    return torch.stack(new_tokens, 1) if new_tokens else input_ids.new_zeros(B, 0)
