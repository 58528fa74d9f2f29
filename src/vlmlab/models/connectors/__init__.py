"""Connectors: ``[B, N_vis, D_vis] -> [B, N_tok, D_lm]``, chosen by name from ``CONNECTORS``.

[Contract] A connector is an ``nn.Module`` built as ``CONNECTORS[name](in_dim, out_dim, **params)`` with
``num_tokens(n_vis) -> n_tok``. Add one: a file in this folder and one line below.
"""

from vlmlab.models.connectors.mgm import MGMConnector
from vlmlab.models.connectors.mlp import GLUProjector, Identity, linear, mlp2x_gelu
from vlmlab.models.connectors.perceiver import FlamingoPerceiver, Idefics2Perceiver
from vlmlab.models.connectors.pixel_shuffle import DownsampleMLP, Idefics3Connector, PixelShuffleMLP
from vlmlab.models.connectors.qformer import qformer
from vlmlab.models.connectors.resampler import minicpm_resampler, qwen_vl_adapter
from vlmlab.models.connectors.sva import SpatialVisionAggregator
from vlmlab.registry import Registry

CONNECTORS = Registry("connector")
CONNECTORS["linear"] = linear
CONNECTORS["mlp2x_gelu"] = mlp2x_gelu
CONNECTORS["identity"] = Identity
CONNECTORS["glu"] = GLUProjector
CONNECTORS["qwen_vl_adapter"] = qwen_vl_adapter
CONNECTORS["minicpm_resampler"] = minicpm_resampler
CONNECTORS["perceiver"] = FlamingoPerceiver
CONNECTORS["idefics2_perceiver"] = Idefics2Perceiver
CONNECTORS["idefics3"] = Idefics3Connector
CONNECTORS["qformer"] = qformer
CONNECTORS["pixel_shuffle_mlp"] = PixelShuffleMLP
CONNECTORS["mlp_downsample"] = DownsampleMLP
CONNECTORS["sva"] = SpatialVisionAggregator
CONNECTORS["mgm"] = MGMConnector
