"""Vision towers: ``[B, 3, H, W] -> [B, N_vis, D_vis]``, chosen by name from ``ENCODERS``.

[Contract] A tower is an ``nn.Module`` with ``hidden_size`` (D_vis), ``num_tokens`` (N_vis at its
configured image size) and ``forward(pixel_values) -> features``. Builders take a ``VisionConfig``.
"""

from vlmlab.registry import Registry

ENCODERS = Registry("vision encoder")
