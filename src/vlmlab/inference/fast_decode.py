"""vlmlab's own decode step for Llama-family decoders (Llama, Qwen2, Mistral): one new token per row, the KV cache
read and written in place.

Why: a decode step reads every weight once, so it should cost its memory traffic. Run through transformers' own
modules it costs more: every layer goes through module calls, decorators, keyword plumbing, a mask built per step
and a cache ``update``, a few hundred small operations per token that add up to several milliseconds per step at
the ``vlmlab bench`` size (docs/bench.md, "Batch-8 decoding"). This module does the same arithmetic with plain
tensor operations on the decoder's own parameters:

- RMSNorm with transformers' formula; RoPE with cos/sin from the decoder's own ``rotary_emb`` (so every rope
  scaling type is computed by transformers itself), applied as ``x * cos + swap_halves(x) * sin_signed``, which
  is ``rotate_half(x) * sin`` bit for bit;
- every projection as ``W @ h.T`` (``linear_t``), which streams the weights faster than ``nn.Linear`` at a few
  rows, q/k/v into one buffer so that one RoPE pass covers q and k;
- keys and values written into the preallocated cache buffers of ``generate``'s ``PreallocatedLayer`` at the
  step's column (prefill, run by transformers' decoder, filled them) and attention over the filled part with the
  padding mask (left-padded rows exact), grouped-query heads packed as transformers' SDPA path packs them;
- the MLP with the module's own activation.

Weights are read from the modules at every step: no fused or repacked copies (fusing q/k/v and gate/up into
larger matrices would save a few percent of a step, for a second copy of two thirds of the decoder's weights),
so an update between two calls is never missed. Logits agree with transformers' full recompute within 1e-5
(tests/test_fast_decode.py); what it cannot reproduce exactly (another architecture, a sliding window the
generation would reach, partial rotary, hooks or adapters, half precision or autocast, training mode) gets
``None`` from ``fast_decoder`` and keeps transformers' path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> the transformers classes whose forward this module reproduces.
_FAMILIES = {
    "llama": "transformers.models.llama.modeling_llama.Llama",
    "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2",
    "mistral": "transformers.models.mistral.modeling_mistral.Mistral",
}
_PARTS = ("DecoderLayer", "Attention", "MLP", "RMSNorm")


def _family_classes(model_type: str) -> dict[str, type] | None:
    """``{"DecoderLayer": LlamaDecoderLayer, ...}`` for a supported ``model_type``, else None."""
    import importlib

    prefix = _FAMILIES.get(model_type)
    if prefix is None:
        return None
    module_name, _, stem = prefix.rpartition(".")
    module = importlib.import_module(module_name)
    return {part: getattr(module, stem + part) for part in _PARTS}


def unsupported_reason(language, cache) -> str | None:
    """Why ``language`` with ``cache`` cannot take the fast decode step, or None when it can."""
    from vlmlab.inference.generate import PreallocatedLayer

    config = language.config
    classes = _family_classes(config.model_type)
    if classes is None:
        return f"model_type {config.model_type!r}"
    if language.training:
        return "training mode (dropout)"
    if config._attn_implementation not in ("eager", "sdpa"):
        return f"attention implementation {config._attn_implementation!r}"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary"
    if (
        cache is None
        or not cache.layers
        or not all(type(layer) is PreallocatedLayer for layer in cache.layers)
    ):
        # kv_cache preallocates only when every layer attends to everything it has seen (a sliding window that
        # the generation would reach keeps transformers' own cache).
        return "cache not preallocated (sliding window in effect, or another layer kind)"
    decoder = language.get_decoder()
    layers = decoder.layers[: config.num_hidden_layers]
    if len(layers) != len(cache.layers):
        return "cache and decoder layers differ"
    if torch.is_autocast_enabled(decoder.norm.weight.device.type):
        return "autocast"
    globals_ = nn.modules.module
    if getattr(globals_, "_global_forward_hooks", None) or getattr(
        globals_, "_global_forward_pre_hooks", None
    ):
        return "global forward hooks"
    for m in decoder.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return "forward hooks in the decoder"
        # fp32 only: transformers' RMSNorm and RoPE cast to and from fp32 around half-precision weights, and a
        # half-precision matmul through another BLAS call need not give the same bits.
        if any(p is not None and p.dtype != torch.float32 for p in m._parameters.values()):
            return "not an fp32 decoder"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = {
            "DecoderLayer": [layer],
            "Attention": [attn],
            "MLP": [mlp],
            "RMSNorm": [layer.input_layernorm, layer.post_attention_layernorm],
        }
        if any(type(m) is not classes[part] for part, ms in parts.items() for m in ms):
            return "a layer that is not the plain family structure"
        projections = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if any(type(p) is not nn.Linear for p in projections):
            return "a projection that is not a plain nn.Linear (adapter, quantization)"
    if type(decoder.norm) is not classes["RMSNorm"]:
        return "final norm"
    return None


def fast_decoder(language, cache) -> FastDecoder | None:
    """The fast decode step for ``language`` over ``cache`` (``generate``'s preallocated one), or None when
    ``unsupported_reason`` says it cannot reproduce the decoder."""
    return None if unsupported_reason(language, cache) else FastDecoder(language, cache)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm, operation for operation (fp32 in, fp32 out)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def linear_t(proj: nn.Linear, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``proj(x).T`` for ``x [B, in]`` (contiguous): ``W @ x.T``, ``[out, B]`` (written to ``out`` if given).

    The same dot products as ``nn.Linear``'s ``x @ W.T``, but with B << out BLAS streams ``W`` faster this way
    (see ``last_logits`` in generate.py; the bench's decoder matrices at batch 8: ~18 GB/s against ~13 with 2
    threads, ~10% with 1). The small operand must be the transposed view of a row-major ``[B, in]``: ``W @ X``
    with ``X`` a contiguous ``[in, B]`` takes another MKL kernel, twice as slow."""
    if proj.bias is None:
        return torch.mm(proj.weight, x.T, out=out)
    return torch.addmm(proj.bias[:, None], proj.weight, x.T, out=out)


def rope_t(xt: torch.Tensor, cos_t: torch.Tensor, sin_signed_t: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, transposed: ``xt [heads, hd, B]``, ``cos_t``/``sin_signed_t [hd, B]``."""
    heads, hd, B = xt.shape
    swapped = xt.view(heads, 2, hd // 2, B).flip(1).view(heads, hd, B)  # [x2, x1]
    return swapped.mul_(sin_signed_t).add_(xt * cos_t)


class FastDecoder:
    """``decoder(embeds [B, 1, D], mask [B, n], positions [B, 1]) -> [B, D]``: the final-normed hidden state of
    one new token per row, whose keys and values go to cache column ``n - 1`` (``mask`` covers the cached
    columns and the new one).

    The residual stream is ``[B, D]``; each projection's output comes out transposed (``linear_t``), which the
    elementwise work (RoPE, the MLP's activation) takes as it is. Built per ``generate`` call; the module
    references it holds are the decoder's own parameters."""

    def __init__(self, language, cache):
        decoder = language.get_decoder()
        self.layers = list(decoder.layers[: language.config.num_hidden_layers])
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb
        self.cache_layers = cache.layers

    def ready(self, embeds: torch.Tensor) -> bool:
        """Whether this step can run here: one new token per row, after transformers' prefill filled the cache."""
        return embeds.shape[1] == 1 and self.cache_layers[0].is_initialized

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = mask.shape[1]
        cos, sin = self.rotary_emb(embeds, positions)  # [B, 1, hd], as the decoder computes them
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == swap_halves(x) * cat(-sin1, sin2): the same products, the sign moved (exact).
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        cos_t, sin_signed_t = cos[:, 0].T.contiguous(), sin_signed[:, 0].T.contiguous()  # [hd, B]
        # [B, 1, 1, n] additive (0 / -inf), broadcast over heads and packed queries: what SDPA would turn a
        # boolean mask into in every layer.
        attn_mask = embeds.new_zeros(mask.shape).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        x = embeds[:, 0]  # [B, D]
        for layer, cached in zip(self.layers, self.cache_layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = rms_norm(x, layer.input_layernorm)
            out = self._attention(attn, h, cached, n, cos_t, sin_signed_t, attn_mask)  # [B, H * hd]
            x = x + linear_t(attn.o_proj, out).T  # (x + y.T is laid out as x: [B, D] contiguous)
            h = rms_norm(x, layer.post_attention_layernorm)
            gate_t, up_t = linear_t(mlp.gate_proj, h), linear_t(mlp.up_proj, h)  # [F, B]
            # act(gate) * up, written row-major [B, F]: down_proj's input the way linear_t wants it.
            act = torch.mul(mlp.act_fn(gate_t).T, up_t.T, out=h.new_empty(up_t.shape[::-1]))
            x = x + linear_t(mlp.down_proj, act).T
        return rms_norm(x, self.norm)

    @staticmethod
    def _attention(attn, h, cached, n, cos_t, sin_signed_t, attn_mask) -> torch.Tensor:
        """Attention of the new token over cache columns ``[0, n)``, ``[B, H * hd]`` (o_proj's input); writes the
        new key and value to column ``n - 1``."""
        B, hd = h.shape[0], attn.head_dim
        H, Hkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        # q, k and v computed into one [(H + 2 Hkv) * hd, B] buffer, so that one RoPE pass covers q and k.
        qkv_t = h.new_empty((H + 2 * Hkv) * hd, B)
        q_k_v = qkv_t.split([H * hd, Hkv * hd, Hkv * hd])
        for proj, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), q_k_v):
            linear_t(proj, h, out=out)
        qk_t = rope_t(qkv_t[: (H + Hkv) * hd].view(H + Hkv, hd, B), cos_t, sin_signed_t)
        q_t, k_t, v_t = qk_t[:H], qk_t[H:], q_k_v[2].view(Hkv, hd, B)  # [heads, hd, B]
        cached.key_buf[:, :, n - 1] = k_t.permute(2, 0, 1)
        cached.value_buf[:, :, n - 1] = v_t.permute(2, 0, 1)
        # The filled part, kept as the layer's keys/values (what a DynamicLayer would hold).
        cached.keys, cached.values = cached.key_buf[:, :, :n], cached.value_buf[:, :, :n]
        # Grouped-query heads: query head h reads kv head h // groups, so [B, H, hd] -> [B, Hkv, groups, hd]
        # runs the groups as that kv head's queries (transformers' pack_gqa for one token).
        q = q_t.permute(2, 0, 1).reshape(B, Hkv, H // Hkv, hd).contiguous()
        out = F.scaled_dot_product_attention(
            q, cached.keys, cached.values, attn_mask=attn_mask, scale=attn.scaling
        )
        return out.view(B, -1)
