"""Connectors: ``[B, N_vis, D_vis] -> [B, N_tok, D_lm]``, chosen by name from ``CONNECTORS``.

[Contract] A connector is an ``nn.Module`` built as ``CONNECTORS[name](in_dim, out_dim, **params)`` with
``num_tokens(n_vis) -> n_tok``. Add one: a file in this folder and one line below.
"""

from vlmlab.models.connectors.mlp import linear, mlp2x_gelu
from vlmlab.registry import Registry

CONNECTORS = Registry("connector")
CONNECTORS["linear"] = linear
CONNECTORS["mlp2x_gelu"] = mlp2x_gelu
