"""vlmlab's own decode step for Llama-family decoders (Llama, Qwen2, Mistral): one new token per row, the KV cache
read and written in place.

Why: a decode step reads every weight once, so it should cost its memory traffic. Run through transformers' own
modules it costs more: every layer goes through module calls, decorators, keyword plumbing, a mask built per step
and a cache ``update``, a few hundred small operations per token that add up to several milliseconds per step at
the ``vlmlab bench`` size (docs/bench.md, "Batch-8 decoding"). This module does the same arithmetic with plain
tensor operations on the decoder's own parameters:

- RMSNorm with transformers' formula (one fused ``F.rms_norm``); RoPE with cos/sin from the decoder's own
  ``rotary_emb`` (so every rope scaling type is computed by transformers itself), applied as
  ``x * cos + swap_halves(x) * sin_signed``, which is ``rotate_half(x) * sin`` bit for bit, on q and k side by
  side so that one pass covers both;
- every projection through ``linear``: oneDNN's fp32 matmul where torch has it, which streams the weights
  at a few rows much faster than the MKL GEMM behind ``nn.Linear`` on CPU;
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


def _onednn_linear():
    """oneDNN's fp32 linear (``x @ W.T + b``) as torch exposes it (``torch.ops.mkldnn._linear_pointwise``, the op
    Inductor emits for CPU linears), or None when this build has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    try:  # a build may list the op without a working kernel for this CPU
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        if not torch.equal(op(x, w, None, "none", [], ""), x @ w.T):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return op


_ONEDNN = _onednn_linear()


def linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows ``x [B, in]`` (contiguous): ``[B, out]``, the same dot products.

    Why not ``F.linear``: a decode step multiplies every weight matrix by a handful of rows, and at that shape
    the BLAS torch calls on CPU (MKL) is far from the machine's speed: ``h @ W.T`` for the ``vlmlab bench``
    decoder's matrices at 8 rows runs at ~12 GB/s with 2 threads, and at one row MKL takes a GEMM path slower
    still. oneDNN's fp32 matmul (Inductor's CPU linear) streams the same weights from their place, no copy or
    repacking, faster at every batch size measured (docs/bench.md, "Batch-8 decoding"). Elsewhere (another
    device, another dtype, a build without oneDNN) this is ``W @ x.T``, transposed back: on CPU still faster
    than ``x @ W.T`` at a few rows."""
    x = x.contiguous()
    if _ONEDNN is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
        return _ONEDNN(x, weight, bias, "none", [], "")
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.T)
    return (out if bias is None else out.add_(bias[:, None])).T


class FastDecoder:
    """``decoder(embeds [B, 1, D], mask [B, n], positions [B, 1]) -> [B, D]``: the final-normed hidden state of
    one new token per row, whose keys and values go to cache column ``n - 1`` (``mask`` covers the cached
    columns and the new one).

    Built per ``generate`` call; the module references it holds are the decoder's own parameters."""

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
        # [B, 1, 1, n] additive (0 / -inf), broadcast over heads and packed queries: what SDPA would turn a
        # boolean mask into in every layer.
        attn_mask = embeds.new_zeros(mask.shape).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        x = embeds[:, 0].clone()  # [B, D], the residual stream, updated in place
        for layer, cached in zip(self.layers, self.cache_layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(x, layer.input_layernorm)
            x.add_(self._attention(attn, h, cached, n, cos, sin_signed, attn_mask))
            h = _rms_norm(x, layer.post_attention_layernorm)
            act = mlp.act_fn(_linear(mlp.gate_proj, h)).mul_(_linear(mlp.up_proj, h))
            x.add_(_linear(mlp.down_proj, act))
        return _rms_norm(x, self.norm)

    @staticmethod
    def _attention(attn, h, cached, n, cos, sin_signed, attn_mask) -> torch.Tensor:
        """``o_proj`` of the new token's attention over cache columns ``[0, n)``, ``[B, D]``; writes the new key
        and value to column ``n - 1``."""
        B, hd = h.shape[0], attn.head_dim
        H, Hkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        # q and k side by side, [B, H + Hkv, hd], so that one RoPE pass covers both.
        qk = torch.cat([_linear(attn.q_proj, h), _linear(attn.k_proj, h)], dim=1).view(B, H + Hkv, hd)
        swapped = qk.view(B, H + Hkv, 2, hd // 2).flip(2).view(B, H + Hkv, hd)  # [x2, x1]
        qk = swapped.mul_(sin_signed).add_(qk * cos)
        cached.key_buf[:, :, n - 1] = qk[:, H:]
        cached.value_buf[:, :, n - 1] = _linear(attn.v_proj, h).view(B, Hkv, hd)
        # The filled part, kept as the layer's keys/values (what a DynamicLayer would hold).
        cached.keys, cached.values = cached.key_buf[:, :, :n], cached.value_buf[:, :, :n]
        # Grouped-query heads: query head h reads kv head h // groups, so [B, H, hd] -> [B, Hkv, groups, hd]
        # runs the groups as that kv head's queries (transformers' pack_gqa for one token).
        q = qk[:, :H].reshape(B, Hkv, H // Hkv, hd)
        out = F.scaled_dot_product_attention(
            q, cached.keys, cached.values, attn_mask=attn_mask, scale=attn.scaling
        )
        return _linear(attn.o_proj, out.reshape(B, H * hd))


def _linear(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(proj.weight, proj.bias, x)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))``, fp32) as one fused op."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
