"""Deep fusion: layers that change the decoder itself, not only its input embeddings (SYSTEMS.md §0).

``routed``: modality-routed linear layers (CogVLM's visual expert, InternLM-XComposer2's Partial LoRA).
"""

from vlmlab.models.fusion.routed import (
    ROUTING_MODES,
    ModalityRoutedLinear,
    RoutingState,
    apply_routing,
    remove_routing,
    routing,
)

__all__ = [
    "ROUTING_MODES",
    "ModalityRoutedLinear",
    "RoutingState",
    "apply_routing",
    "remove_routing",
    "routing",
]
