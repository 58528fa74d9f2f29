"""Cross-attention from the decoder's hidden states to visual features, hooked into a pretrained decoder (§0, §9, §21).

Two placements, one attention:

- ``gated`` -- Flamingo's GATED XATTN-DENSE (mlfoundations/open_flamingo ``src/helpers.py``; transformers'
  ``IdeficsGatedCrossAttentionLayer``, ``MllamaCrossAttentionDecoderLayer``): in front of chosen decoder layers,
  ``y = y + tanh(a) * XAttn(norm(y), media)``, then ``y = y + tanh(b) * FF(norm(y))``, with the gates ``a = b = 0``
  at init, so a fresh model is the base LLM exactly, for any image.
- ``parallel`` -- CogAgent's high-resolution branch (THUDM/CogVLM ``cogagent_model.py``; SYSTEMS.md §9): inside
  *every* decoder layer, after self-attention and its residual, ``y = y + XAttn(norm(y), hr_features)``, ungated,
  with a small inner width (CogAgent: 1024 = 32 heads of 32), before the MLP.

[Contract] The decoder's code and state-dict keys are untouched. The blocks live outside the decoder (the model
holds them); a forward pre-hook on each chosen decoder layer (``gated``), or a pre-hook on the layer plus a forward
hook on its ``self_attn`` (``parallel``: ``attn_out`` becomes ``attn_out + XAttn(norm(residual + attn_out))``, which
the layer adds to its residual) applies them. The hooks read everything from attributes (no closures), so a
``copy.deepcopy`` of the model (EMA, a DPO reference) runs its own copies. Outside a ``media`` block, or with no
media, the hooks do nothing and the decoder is the base LLM exactly.

[Contract] The media mask. ``media(decoder, features, mask)`` sets ``features`` ``[B, U, M, D_media]`` (``U`` media
units per sample -- images, or tiles -- of ``M`` tokens each, zero-padded) and ``mask`` ``[B, L, U]`` (True = the
token at sequence position ``l`` sees unit ``u``) for sequence positions ``0 .. L-1``; positions ``>= L`` (generated
tokens) see what position ``L - 1`` sees. As with ``routing.py``, a decoder pre-hook slices the rows of the tokens of
each forward from the KV cache's length. Each block's keys and values are computed from the features once per
``media`` block (cached through generation; they do not depend on the text). An optional ``valid`` ``[B, U, M]``
(True = a real feature row) hides padded rows of a unit (transformers' Mllama: the padding tiles of an image) from
the tokens that see the unit. A row that sees no (valid) feature row attends to nothing: its attention output is
zeroed (``empty_rows="zero_attn"``: Flamingo, Idefics), or -- transformers' Mllama -- it attends to every row,
padding included, and its FF output is zeroed instead (``"zero_ff"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.fusion.hooks import forward_span, hooked_state
from vlmlab.models.layers import CrossAttention, GeluFF, SwiGLU, norm_layer

CROSS_KINDS = ("gated", "parallel")
EMPTY_ROWS = ("zero_attn", "zero_ff")
PLACEMENTS = ("idefics", "openflamingo", "every")


def cross_layers(n_layers: int, every: int, placement: str) -> list[int]:
    """Decoder layer indices that get a block in front of them: Idefics ``i % n == 0``, OpenFlamingo
    ``(i + 1) % n == 0`` (SYSTEMS.md §23: the two references differ), ``every`` = all layers."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"cross-attention placement {placement!r} is not one of {list(PLACEMENTS)}")
    if every < 1:
        raise ConfigError(f"cross-attention every must be >= 1, got {every}")
    if placement == "every":
        return list(range(n_layers))
    shift = 0 if placement == "idefics" else 1
    return [i for i in range(n_layers) if (i + shift) % every == 0]


def media_mask(
    input_ids: torch.Tensor,
    image_token_id: int,
    group_consecutive: bool = False,
    reset_token_id: int | None = None,
) -> torch.Tensor:
    """``[B, T]`` ids -> ``[B, T, N_max]`` bool: which of its sample's images (in order) each token sees.

    Flamingo's rule (``only_attend_immediate_media``): a token sees the most recent image, its own ``<image>``
    token included; tokens before the first image see none. ``group_consecutive`` (Mllama): a run of adjacent
    image tokens forms one group, and the tokens from the run on see every image of it. ``reset_token_id``
    (Idefics' end-of-document): tokens after it see no image until the next one."""
    is_img = input_ids == image_token_id
    count = is_img.long().cumsum(1)  # images seen up to and including t
    first = count - 1  # the first image a token sees: the latest one ...
    if group_consecutive:  # ... or the first image of the latest run of adjacent image tokens
        starts = is_img & ~F.pad(is_img[:, :-1], (1, 0), value=False)
        first = torch.where(starts, count - 1, torch.full_like(count, -1)).cummax(1).values
    sees_any = count > 0
    if reset_token_id is not None:
        reset = F.pad((input_ids == reset_token_id)[:, :-1], (1, 0), value=False)  # after the token
        # The latest reset and the latest image, by position: an image after the reset re-opens the view.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_reset = torch.where(reset, pos, torch.full_like(pos, -1)).cummax(1).values
        last_img = torch.where(is_img, pos, torch.full_like(pos, -1)).cummax(1).values
        sees_any &= last_img >= last_reset
    n_max = max(int(count[:, -1].max()) if count.numel() else 0, 1)
    units = torch.arange(n_max, device=input_ids.device)
    return sees_any[..., None] & (units >= first[..., None]) & (units < count[..., None])


@dataclass
class BlockSettings:
    """What a model's ``CrossAttentionConfig`` fixes for each of its blocks."""

    kind: str
    heads: int
    head_dim: int
    kv_heads: int | None = None
    norm: str = "rmsnorm"
    ff: str | None = "swiglu"
    ff_hidden: int = 0
    qk_norm: bool = False
    gate: str = "scalar"
    empty_rows: str = "zero_attn"
    eps: float = 1e-6


class CrossAttentionBlock(nn.Module):
    """One cross-attention insertion. ``gated``: norm -> XAttn -> tanh-gated residual, then norm -> FF ->
    tanh-gated residual (gates zeros: ``[1]`` or, Idefics' ``alpha_type="vector"``, ``[D]``). ``parallel``:
    norm -> XAttn, ungated and without FF; the hooks add it after the layer's self-attention."""

    def __init__(self, dim: int, media_dim: int, s: BlockSettings):
        super().__init__()
        if s.kind not in CROSS_KINDS:
            raise ConfigError(f"cross-attention kind {s.kind!r} is not one of {list(CROSS_KINDS)}")
        if s.empty_rows not in EMPTY_ROWS:
            raise ConfigError(f"cross-attention empty_rows {s.empty_rows!r} is not one of {list(EMPTY_ROWS)}")
        self.kind, self.empty_rows = s.kind, s.empty_rows
        self.attn_norm = norm_layer(s.norm, dim, s.eps)
        self.attn = CrossAttention(dim, media_dim, s.heads, s.head_dim, s.kv_heads, s.qk_norm, s.eps)
        self.ff_norm = self.ff = self.attn_gate = self.ff_gate = None
        if s.kind == "gated":
            if s.gate not in ("scalar", "vector"):
                raise ConfigError(f"cross-attention gate {s.gate!r} is not one of ['scalar', 'vector']")
            shape = 1 if s.gate == "scalar" else dim
            self.attn_gate = nn.Parameter(torch.zeros(shape))  # tanh(0) = 0: the base LLM at init
            self.ff_gate = nn.Parameter(torch.zeros(shape))
            if s.ff is not None:
                if s.ff not in ("swiglu", "gelu"):
                    raise ConfigError(f"cross-attention ff {s.ff!r} is not one of ['swiglu', 'gelu', None]")
                self.ff_norm = norm_layer(s.norm, dim, s.eps)
                self.ff = SwiGLU(dim, s.ff_hidden, dim) if s.ff == "swiglu" else GeluFF(dim, s.ff_hidden)

    def forward(self, x: torch.Tensor, kv, bias, rows: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, D]; ``rows`` [B, T, 1] (1 = the token sees some media). Returns the new hidden states
        (``gated``) or the increment to add (``parallel``)."""
        a = self.attn(self.attn_norm(x), kv, bias)
        if self.kind == "parallel":
            return a
        if self.empty_rows == "zero_attn":
            a = a * rows
        x = x + self.attn_gate.tanh() * a
        if self.ff is None:
            return x
        f = self.ff(self.ff_norm(x))
        if self.empty_rows == "zero_ff":
            f = f * rows
        return x + self.ff_gate.tanh() * f


class MediaState:
    """The media of one ``media`` block, shared by every block of one decoder (not in the state dict)."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None  # [B, U * M, D_media]
        self.mask: torch.Tensor | None = None  # [B, L, U] bool
        self.valid: torch.Tensor | None = None  # [B, U * M] bool, or None: every row is real
        self.per_unit = 1  # M
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block id -> keys, values
        self.bias: torch.Tensor | None = None  # [B, 1, T, U * M] for the current forward
        self.rows: torch.Tensor | None = None  # [B, T, 1]

    def select(self, offset: int, length: int, batch: int, dtype: torch.dtype) -> None:
        if self.features is None:
            return
        if self.mask.shape[0] != batch:
            raise SampleError(
                f"media mask has batch {self.mask.shape[0]} but the decoder forward has {batch}"
            )
        mask = self.mask[:, offset : offset + length]
        if mask.shape[1] < length:  # generated tokens see what the last prompt token sees
            last = self.mask[:, -1:].expand(-1, length - mask.shape[1], -1)
            mask = torch.cat([mask, last], dim=1)
        mask = mask.repeat_interleave(self.per_unit, dim=2)  # [B, T, U * M]
        if self.valid is not None:
            mask = mask & self.valid[:, None]
        rows = mask.any(-1, keepdim=True)  # [B, T, 1]
        # A row that sees nothing attends to every row (finite softmax; its output is zeroed per empty_rows).
        mask = mask | ~rows
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        self.bias = bias.masked_fill(~mask, torch.finfo(dtype).min)[:, None]
        self.rows = rows.to(dtype)

    def keys_values(self, block: CrossAttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv.get(id(block))
        if kv is None:
            kv = self.kv[id(block)] = block.attn.kv(self.features)
        return kv


def _state_of(decoder: nn.Module) -> MediaState:
    return hooked_state(decoder, "_vlmlab_media", "apply_cross_attention")


def _select_media(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    x, offset = forward_span(args, kwargs)
    dtype = decoder.get_input_embeddings().weight.dtype if x.dtype == torch.long else x.dtype
    _state_of(decoder).select(offset, x.shape[1], x.shape[0], dtype)


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _gated_pre_hook(layer: nn.Module, args: tuple, kwargs: dict):
    block, state = layer._vlmlab_xattn
    if state.features is None:
        return None
    h = _hidden_of(args, kwargs)
    out = block(h, state.keys_values(block), state.bias, state.rows)
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": out}


def _parallel_pre_hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    layer._vlmlab_xattn[1].residual = _hidden_of(args, kwargs)  # the layer's input: self-attention's residual


def _parallel_attn_hook(attn: nn.Module, args: tuple, kwargs: dict, output):
    block, state = attn._vlmlab_xattn
    if state.features is None:
        return None
    attn_out = output[0] if isinstance(output, tuple) else output
    h = state.residual + attn_out  # what the layer is about to compute
    attn_out = attn_out + block(h, state.keys_values(block), state.bias, state.rows)
    return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out


def apply_cross_attention(decoder: nn.Module, blocks: dict[int, CrossAttentionBlock]) -> None:
    """Hook ``blocks`` (decoder layer index -> block, all of one kind) into ``decoder`` (a transformers base model
    whose ``layers`` take the hidden states first and, for ``parallel``, have a ``self_attn`` returning
    ``(attn_out, ...)``: the Llama/Qwen2/Mistral family)."""
    if getattr(decoder, "_vlmlab_media", None) is not None:
        raise ConfigError(f"{type(decoder).__name__} already has cross-attention")
    layers = decoder.layers
    state = MediaState()
    handles = [decoder.register_forward_pre_hook(_select_media, with_kwargs=True)]
    for i, block in blocks.items():
        if not 0 <= i < len(layers):
            raise ConfigError(f"cross-attention layer {i} is not a layer of a {len(layers)}-layer decoder")
        layer = layers[i]
        # Tuples keep nn.Module from registering the block under the decoder: its keys stay the base LLM's.
        layer._vlmlab_xattn = (block, state)
        if block.kind == "gated":
            handles.append(layer.register_forward_pre_hook(_gated_pre_hook, with_kwargs=True))
        else:
            layer.self_attn._vlmlab_xattn = (block, state)
            handles.append(layer.register_forward_pre_hook(_parallel_pre_hook, with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(_parallel_attn_hook, with_kwargs=True))
    decoder._vlmlab_media = (state, handles)


@contextlib.contextmanager
def media(
    decoder: nn.Module,
    features: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> Iterator[MediaState]:
    """Run every forward of ``decoder`` inside the block with ``features`` ``[B, U, M, D_media]`` seen per
    ``mask`` ``[B, L, U]``; ``valid`` ``[B, U, M]`` bool marks the real rows of each unit (None: all are).
    ``features=None``: the base decoder."""
    state = _state_of(decoder)
    saved = (state.features, state.mask, state.valid, state.per_unit, state.kv)
    if features is not None:
        if features.dim() != 4:
            raise SampleError(f"media features must be [B, U, M, D], got {list(features.shape)}")
        b, u, m, _ = features.shape
        if mask is None:
            raise SampleError("media needs a [B, L, U] mask (which units each token sees)")
        if mask.dim() != 3 or mask.shape[0] != b or mask.shape[2] != u or mask.dtype != torch.bool:
            raise SampleError(
                f"media mask must be a [B, L, U] = [{b}, L, {u}] bool tensor, got {mask.dtype} "
                f"{list(mask.shape)}"
            )
        if valid is not None and (valid.shape != (b, u, m) or valid.dtype != torch.bool):
            raise SampleError(
                f"media valid must be a [B, U, M] = [{b}, {u}, {m}] bool tensor, got {valid.dtype} "
                f"{list(valid.shape)}"
            )
        state.features, state.mask, state.per_unit = features.flatten(1, 2), mask, m
        state.valid = valid.flatten(1) if valid is not None else None
    else:
        state.features, state.mask, state.valid = None, None, None
    state.kv = {}
    try:
        yield state
    finally:
        state.features, state.mask, state.valid, state.per_unit, state.kv = saved
        state.bias = state.rows = None
        state.residual = None


def inner_heads(inner: int, head_dim: int) -> int:
    """Heads of an inner width (CogAgent: 1024 / 32 = 32)."""
    if inner % head_dim:
        raise ConfigError(f"cross-attention width {inner} is not a multiple of head_dim {head_dim}")
    return inner // head_dim


__all__ = [
    "CROSS_KINDS",
    "BlockSettings",
    "CrossAttention",
    "CrossAttentionBlock",
    "MediaState",
    "apply_cross_attention",
    "cross_layers",
    "inner_heads",
    "media",
    "media_mask",
]


def build_cross_attention(language, c, load_pretrained: bool) -> tuple[nn.ModuleDict, nn.Module | None]:
    """The blocks of ``c`` (``config.fusion.cross``) hooked into ``language``'s decoder, keyed by layer index,
    and CogAgent's own high-resolution tower for ``parallel`` (None for ``gated``). Fills in ``c.media_dim`` and
    the tower's architecture params so that a saved config rebuilds without the pretrained sources."""
    import dataclasses

    from vlmlab.models.encoders import ENCODERS

    lc = language.config
    decoder = language.get_decoder()
    cross_vision = None
    if c.kind == "parallel":
        if c.vision is None:
            raise ConfigError("fusion.cross.vision: parallel (CogAgent) cross-attention needs its own tower")
        vc = c.vision if load_pretrained else dataclasses.replace(c.vision, pretrained=None)
        cross_vision = ENCODERS[c.vision.name](vc)
        if hasattr(cross_vision, "architecture_params"):
            c.vision.params = cross_vision.architecture_params()
        c.media_dim = cross_vision.hidden_size
    heads = c.heads or lc.num_attention_heads
    ff_hidden = c.ff_hidden or (lc.intermediate_size if c.ff == "swiglu" else 4 * lc.hidden_size)
    settings = BlockSettings(
        kind=c.kind,
        heads=heads,
        head_dim=c.head_dim or lc.hidden_size // heads,
        kv_heads=c.kv_heads,
        norm=c.norm,
        ff=c.ff if c.kind == "gated" else None,
        ff_hidden=ff_hidden,
        qk_norm=c.qk_norm,
        gate=c.gate,
        empty_rows=c.empty_rows,
        eps=getattr(lc, "rms_norm_eps", 1e-6),
    )
    layers = c.layers if c.layers is not None else cross_layers(len(decoder.layers), c.every, c.placement)
    blocks = {i: CrossAttentionBlock(lc.hidden_size, c.media_dim or lc.hidden_size, settings) for i in layers}
    apply_cross_attention(decoder, blocks)
    return nn.ModuleDict({str(i): b for i, b in blocks.items()}), cross_vision


def cross_media(
    model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **extra
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """What the cross-attention blocks read: features ``[B, U, M, D_media]`` (each sample's images in order,
    zero-padded), which of them each token sees, ``[B, T, U]``, and which feature rows are real, ``[B, U, M]``
    bool (None: all are); ``(None, None, None)`` without images.

    ``gated``: the connector's output of ``pixel_values``; each ``<image>`` token is one image and a token sees
    the most recent one (``fusion.cross.media_mask``). A tower with ``real_rows(**its extra inputs) ->
    [N_img, N_vis]`` bool reports which of its output rows are real (Mllama: not those of padding tiles); its
    connector must keep rows one-to-one. ``parallel``: the cross tower's features of ``cross_pixel_values``;
    each run of image placeholders is one image and every token sees all of its sample's images.

    Pixels with 6 dims are transformers' per-sample layout ``[B, N_img, ...]`` (Mllama:
    ``[B, N_img, N_tiles, 3, H, W]``): each sample's images keep their ``N_img`` slots, padding images
    included (encoded, as transformers does: no token sees them, but with ``empty_rows="zero_ff"`` a token that
    sees no image attends to every row)."""
    from vlmlab.models.vlm import _inputs_of, drop_padding_views

    c = model.config.fusion.cross
    is_img = input_ids == model.config.image_token_id
    if model.gated:
        pixels, name = pixel_values, "pixel_values"
        counts = is_img.sum(1)
    else:
        pixels, name = extra.get("cross_pixel_values"), "cross_pixel_values"
        counts = (is_img & ~nn.functional.pad(is_img[:, :-1], (1, 0), value=False)).sum(1)  # runs
    if pixels is None:
        if model.gated and is_img.any():
            raise SampleError(f"{int(is_img.sum())} image tokens in the input but no pixel_values")
        return None, None, None
    valid = None
    if model.gated:
        if pixels.dim() == 5:
            pixels, extra = drop_padding_views(pixels, extra)
        feats = model.encode_images(pixels.to(model.dtype_of_vision()), **extra)  # [N_img, M, D]
        if hasattr(model.vision, "real_rows"):
            valid = model.vision.real_rows(**_inputs_of(model.vision, extra))  # [N_img, M]
            if valid.shape != feats.shape[:2]:
                raise ConfigError(
                    f"the tower's real rows {list(valid.shape)} do not match the connector's output "
                    f"{list(feats.shape[:2])} (real rows need a connector that keeps rows one-to-one)"
                )
        mask = media_mask(
            input_ids,
            model.config.image_token_id,
            c.group_consecutive,
            c.reset_token_id if c.reset_token_id >= 0 else None,
        )
    else:
        feats = model.cross_vision(pixels.to(next(model.cross_vision.parameters()).dtype))
        units = torch.arange(max(int(counts.max()), 1), device=input_ids.device)
        mask = (units < counts[:, None])[:, None, :].expand(-1, input_ids.shape[1], -1)
    if pixels.dim() == 6:  # per-sample slots
        b, slots = pixels.shape[:2]
        if b != len(counts) or int(counts.max()) > slots:
            raise SampleError(
                f"{name} {list(pixels.shape[:2])} has no slot for every image of the text "
                f"({counts.tolist()} images per sample)"
            )
        mask = nn.functional.pad(mask, (0, slots - mask.shape[2]))
        valid = None if valid is None else valid.unflatten(0, (b, slots))
        return feats.unflatten(0, (b, slots)), mask, valid
    if int(counts.sum()) != feats.shape[0]:
        raise SampleError(f"{int(counts.sum())} images in the text but {feats.shape[0]} images in {name}")
    valid = None if valid is None else _by_sample(valid, counts, mask.shape[2])
    return _by_sample(feats, counts, mask.shape[2]), mask, valid


def _by_sample(x: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """``[N_img, ...]`` (every sample's images in order) -> ``[B, n, ...]``, each sample's zero-padded to ``n``."""
    out = x.new_zeros(len(counts), n, *x.shape[1:])
    for b, rows in enumerate(x.split(counts.tolist())):
        out[b, : len(rows)] = rows
    return out
