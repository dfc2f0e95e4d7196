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
from flax_impl.common.models import MODELS, model_widths


def to_inputs(images: torch.Tensor, augment: Callable | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 28, 28) -> the model's input, (B, 1, 28, 28) of `dtype`, normalised.

    `augment`, if given, transforms the [0, 1] pixels before normalisation (so that what a
    rotation brings in from outside the image is black).
    """
    pixels = images.unsqueeze(1).to(dtype) / 255.0
    return normalize(augment(pixels) if augment else pixels)


class ConvBlock(nn.Module):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU -> channel dropout (whole feature maps)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.bn(self.conv(x))))


class Net(nn.Module):
    """Our sub-20k CNN: six 3x3 conv blocks, one max-pool, global average pooling, a linear head.

    Spatial sizes 28 -> 26 -> 24 -> (pool) 12 -> 10 -> 8 -> 6 -> 4 -> (GAP) 1; receptive field 22.
    `widths`: the blocks' channels; TinyNet and WideNet are the same network, narrower and wider
    (the model table, `flax_impl.common.models`).
    """

    def __init__(self, dropout: float = 0.05, widths: tuple[int, ...] = MODELS["net"].widths):
        super().__init__()
        w1, w2, w3, w4, w5, w6 = widths
        self.block1 = ConvBlock(1, w1, dropout)
        self.block2 = ConvBlock(w1, w2, dropout)
        self.block3 = ConvBlock(w2, w3, dropout)
        self.block4 = ConvBlock(w3, w4, dropout)
        self.block5 = ConvBlock(w4, w5, dropout)
        self.block6 = ConvBlock(w5, w6, 0.0)
        self.head = nn.Linear(w6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        x = F.max_pool2d(x, 2)
        x = self.block6(self.block5(self.block4(self.block3(x))))
        x = x.mean(dim=(2, 3))
        return F.log_softmax(self.head(x), dim=1)


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None) -> Net:
    """A fresh model `name` of the table (`flax_impl.common.models`) at `widths` (default: its
    own)."""
    return Net(dropout, model_widths(name, widths))
