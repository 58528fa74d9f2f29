"""Modality-routed linear layers: text rows use the frozen LLM weights, image rows get their own (SYSTEMS.md §0).

Two systems, one layer:

- ``expert`` -- CogVLM's visual expert (Wang et al. 2023, THUDM/CogVLM ``utils/models/mixin.py``; SYSTEMS.md §8):
  image rows go through a separate Linear initialised as a copy of the LLM's (``copy_param``), so right after
  wrapping the model equals the base LLM. CogVLM fuses Q/K/V into one expert; one expert per projection is the
  same function.
- ``plora`` -- InternLM-XComposer2's Partial LoRA (Dong et al. 2024, remote ``build_mlp.py`` ``PLoRA``; §14):
  ``y = W x (+ b) + (alpha / r) * B A dropout(x)`` on image rows only. ``B`` starts at zero, which is the reference's
  intent: its ``reset_parameters`` tests ``hasattr(self, 'lora_A')`` while the modules are named ``Plora_A``, so
  the zero-init there is dead code. We implement the intent and note the divergence.

[Contract] Wrapping keeps the decoder's code and its state-dict keys. ``ModalityRoutedLinear`` *is* an
``nn.Linear`` that shares the base's ``weight``/``bias`` Parameters, so ``...q_proj.weight`` keeps its name; the
new weights live next to them (``...q_proj.expert.{weight,bias}`` or ``...q_proj.lora_{A,B}.weight``). The base
LLM's state dict loads into a wrapped model with ``strict=False`` and only the new keys missing, and
``remove_routing`` gives back plain ``nn.Linear`` modules with the same Parameters.

[Contract] The image-row mask. ``routing(decoder, mask)`` sets ``mask`` ``[B, L]`` (True = image row) for
*sequence positions* ``0 .. L-1``. A forward pre-hook on the decoder slices it for each forward: a forward that sees
``T`` tokens after ``P`` cached ones uses ``mask[:, P : P + T]``, and positions ``>= L`` are text rows. So KV-cache
decoding (``generate`` or a manual loop, where a forward sees only the new tokens) routes new tokens as text, and
an uncached recomputation of prompt + generated tokens routes them identically. Outside a ``routing`` block, and
with ``mask=None``, every row is a text row and the decoder is the base LLM exactly. The mask follows the input
layout (left padding included) and its batch must equal the forward's batch (no beam expansion). With gradient
checkpointing the recomputation reads the mask of the last forward, so run ``backward`` inside the block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.fusion.hooks import forward_span, hooked_state

ROUTING_MODES = ("expert", "plora")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RoutingState:
    """The image-row mask shared by every routed layer of one decoder (a plain object: not in the state dict)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, L] bool, for sequence positions 0 .. L-1
        self.rows: torch.Tensor | None = None  # [B, T] bool, for the tokens of the current forward

    def select(self, offset: int, length: int, batch: int) -> None:
        """Set ``rows`` to the mask of positions ``offset .. offset + length - 1`` (text beyond the mask's end)."""
        if self.mask is None:
            self.rows = None
            return
        if self.mask.shape[0] != batch:
            raise SampleError(
                f"routing mask has batch {self.mask.shape[0]} but the decoder forward has batch {batch}"
            )
        rows = self.mask[:, offset : offset + length]
        if rows.shape[1] < length:  # tokens past the mask (generated ones) are text rows
            rows = F.pad(rows, (0, length - rows.shape[1]), value=False)
        self.rows = rows if rows.any() else None  # None = the base path, exactly


class ModalityRoutedLinear(nn.Linear):
    """``y = W x + b`` on text rows; on image rows the visual expert's ``W' x + b'`` or PLoRA's ``+ (a/r) B A x``.

    ``[B, T, in] -> [B, T, out]``. Shares ``base.weight``/``base.bias`` (same Parameters, same names)."""

    def __init__(
        self,
        base: nn.Linear,
        mode: str,
        state: RoutingState,
        rank: int = 256,
        alpha: float = 256.0,
        dropout: float = 0.0,
    ) -> None:
        if mode not in ROUTING_MODES:
            raise ConfigError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")
        # Build an empty Linear on the meta device, then adopt the base's Parameters (no copy, same names).
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.mode = mode
        self._routing = state
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if mode == "expert":
            self.expert = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, **factory
            )
            with torch.no_grad():  # CogVLM `copy_param`: the expert starts as the LLM's weights
                self.expert.weight.copy_(base.weight)
                if base.bias is not None:
                    self.expert.bias.copy_(base.bias)
        else:
            if rank < 1:
                raise ConfigError(f"plora rank must be >= 1, got {rank}")
            self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
            self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)  # the reference's intent (its zero-init is dead code; §14)
            self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        rows = self._routing.rows  # [B, T] or None
        if rows is None:
            return y
        if rows.shape != x.shape[:-1]:
            raise SampleError(
                f"routing mask of shape {tuple(rows.shape)} does not match input rows {tuple(x.shape[:-1])}"
            )
        rows = rows.to(x.device)
        xi = x[rows]  # [N_img, in]: only image rows do the extra work
        if self.mode == "expert":
            yi = self.expert(xi)
        else:
            yi = y[rows] + self.lora_B(self.lora_A(self.lora_dropout(xi))) * self.scale
        return y.index_put((rows,), yi.to(y.dtype))  # text rows stay W x + b, bit for bit

    def new_parameters(self) -> list[nn.Parameter]:
        """The weights this layer adds to the base (the ones to train)."""
        parts = [self.expert] if self.mode == "expert" else [self.lora_A, self.lora_B]
        return [p for m in parts for p in m.parameters()]

    def extra_repr(self) -> str:
        extra = f", rank={self.rank}, alpha={self.alpha}" if self.mode == "plora" else ""
        return f"{super().extra_repr()}, mode={self.mode}{extra}"


def _state_of(decoder: nn.Module) -> RoutingState:
    return hooked_state(decoder, "_vlmlab_routing", "apply_routing(decoder, mode)")


def _select_rows(decoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: slice the mask for this forward's tokens."""
    x, offset = forward_span(args, kwargs)
    _state_of(decoder).select(offset, x.shape[1], x.shape[0])


def apply_routing(
    decoder: nn.Module,
    mode: str,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    rank: int = 256,
    alpha: float = 256.0,
    dropout: float = 0.0,
) -> list[nn.Parameter]:
    """Wrap, in place, every ``nn.Linear`` of ``decoder`` whose attribute name is in ``targets``; return the new
    Parameters. ``decoder`` is a transformers causal LM or base model (Llama/Qwen2/Mistral family): its forward,
    called with ``input_ids`` or ``inputs_embeds`` and an optional ``cache``, is the one the mask is sliced for.
    ``lm_head`` and embeddings are never routed. The defaults ``rank = alpha = 256`` are XComposer2's (scale 1)."""
    if getattr(decoder, "_vlmlab_routing", None) is not None:
        raise ConfigError(f"{type(decoder).__name__} is already routed")
    state = RoutingState()
    new: list[nn.Parameter] = []
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                layer = ModalityRoutedLinear(child, mode, state, rank=rank, alpha=alpha, dropout=dropout)
                setattr(parent, name, layer)
                new += layer.new_parameters()
    if not new:
        raise ConfigError(f"no nn.Linear named one of {targets} in {type(decoder).__name__}")
    handle = decoder.register_forward_pre_hook(_select_rows, with_kwargs=True)
    # A tuple keeps nn.Module from treating it as a submodule/buffer: nothing new in the state dict.
    decoder._vlmlab_routing = (state, handle)
    return new


def remove_routing(decoder: nn.Module) -> None:
    """Undo ``apply_routing``: plain ``nn.Linear`` modules holding the same base Parameters; the new weights go."""
    state = _state_of(decoder)
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ModalityRoutedLinear) and child._routing is state:
                plain = nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    decoder._vlmlab_routing[1].remove()
    decoder._vlmlab_routing = None


@contextlib.contextmanager
def routing(decoder: nn.Module, mask: torch.Tensor | None) -> Iterator[RoutingState]:
    """Route the rows where ``mask`` ``[B, L]`` is True (sequence positions ``0 .. L-1``) to the image weights for
    every forward of ``decoder`` inside the block; ``None`` = text only. Positions ``>= L`` are text rows."""
    state = _state_of(decoder)
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 2):
        raise SampleError(
            f"routing mask must be a [B, L] bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    previous = state.mask
    state.mask, state.rows = mask, None
    try:
        yield state
    finally:
        state.mask, state.rows = previous, None
