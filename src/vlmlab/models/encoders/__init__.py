"""Vision towers: ``[B, 3, H, W] -> [B, N_vis, D_vis]``, chosen by name from ``ENCODERS``.

[Contract] A tower is an ``nn.Module`` built as ``Tower(config: VisionConfig)`` with ``hidden_size`` (D_vis),
``num_tokens`` (N_vis at ``config.image_size``) and ``forward(pixel_values) -> features``.
"""

from vlmlab.models.encoders.blip_vit import BlipViTTower
from vlmlab.models.encoders.convnet import ConvNetTower
from vlmlab.models.encoders.convnext import ConvNextTower
from vlmlab.models.encoders.efficientnet import EfficientNetTower
from vlmlab.models.encoders.fuyu import FuyuPatches
from vlmlab.models.encoders.hf_vit import CLIPTower, SiglipTower
from vlmlab.models.encoders.idefics1_vit import Idefics1ViTTower
from vlmlab.models.encoders.idefics_vit import Idefics2ViTTower, Idefics3ViTTower
from vlmlab.models.encoders.internvit import InternViTTower
from vlmlab.models.encoders.mllama_vit import MllamaViTTower
from vlmlab.models.encoders.tiled import TiledTower
from vlmlab.registry import Registry

ENCODERS = Registry("vision encoder")
ENCODERS["clip"] = CLIPTower
ENCODERS["siglip"] = SiglipTower
ENCODERS["idefics_vit"] = Idefics1ViTTower
ENCODERS["idefics2_vit"] = Idefics2ViTTower
ENCODERS["idefics3_vit"] = Idefics3ViTTower
ENCODERS["convnet"] = ConvNetTower
ENCODERS["efficientnet-lite0"] = EfficientNetTower
ENCODERS["blip_vit"] = BlipViTTower
ENCODERS["internvit"] = InternViTTower
ENCODERS["mllama_vit"] = MllamaViTTower
ENCODERS["convnext"] = ConvNextTower
ENCODERS["tiled"] = TiledTower
ENCODERS["fuyu_patches"] = FuyuPatches
