"""The network in PyTorch: `Net`, < 20k parameters, at the widths of the model table.

Mirrors `flax_impl/model.py` layer for layer and name for name: float32 NCHW (B, 1, 28, 28) in,
`to_inputs(uint8 images)`, (B, 10) log-probabilities out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flax_impl.common.data import normalize
from flax_impl.common.models import MODELS, NET_LAYOUT, conv_layers, model_spec, model_widths


def to_inputs(images: torch.Tensor, augment: Callable | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 28, 28) -> the model's input, (B, 1, 28, 28) of `dtype`, normalised.

    `augment`, if given, transforms the [0, 1] pixels before normalisation (so that what a
    rotation brings in from outside the image is black).
    """
    pixels = images.unsqueeze(1).to(dtype) / 255.0
    return normalize(augment(pixels) if augment else pixels)


class ConvBlock(nn.Module):
    """Convolution (no bias; 3x3 or 1x1, depthwise where `groups` is the input's channels) ->
    BatchNorm -> ReLU -> channel dropout (whole feature maps); the convolution alone if not
    `normalized`."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float,
                 kernel_size: int = 3, groups: int = 1, normalized: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=False)
        self.normalized = normalized
        if normalized:
            self.bn = nn.BatchNorm2d(out_channels)
            self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.dropout(F.relu(self.bn(x))) if self.normalized else x


class Net(nn.Module):
    """Our small CNNs: the conv blocks and max-pools of `layout` at `widths` (the model table,
    `flax_impl.common.models`), global average pooling, a linear head.

    `Net`'s own layout (NET_LAYOUT) is six 3x3 conv blocks and one max-pool; TinyNet and WideNet
    are that network, narrower and wider; SepNet and XSepNet other layouts, of depthwise-separable
    blocks.
    """

    def __init__(self, dropout: float = 0.05, widths: tuple[int, ...] = MODELS["net"].widths,
                 layout: tuple[str, ...] = NET_LAYOUT):
        super().__init__()
        plan = conv_layers(layout, widths)
        for layer in plan:
            if layer != "M":
                self.add_module(layer.name, ConvBlock(
                    layer.in_features, layer.features, dropout if layer.dropout else 0.0,
                    layer.kernel_size, layer.groups, layer.normalized))
        self.head = nn.Linear([layer for layer in plan if layer != "M"][-1].features, 10)
        self.plan = tuple("M" if layer == "M" else layer.name for layer in plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.plan:
            x = F.max_pool2d(x, 2) if layer == "M" else getattr(self, layer)(x)
        x = x.mean(dim=(2, 3))
        return F.log_softmax(self.head(x), dim=1)


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None) -> Net:
    """A fresh model `name` of the table (`flax_impl.common.models`) at `widths` (default: its
    own)."""
    return Net(dropout, model_widths(name, widths), model_spec(name).layout)
