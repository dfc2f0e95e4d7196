"""The networks in PyTorch: `Net` (ours, < 20k parameters) and `SeedNet` (the seed README's).

Mirrors `flax_impl/model.py` layer for layer and name for name. Input: float32 NCHW (B, 1, 28, 28),
`to_inputs(uint8 images)`. Output: (B, 10) log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flax_impl.common.data import normalize
from flax_impl.common.models import MODELS, model_spec, model_widths


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


class SeedNet(nn.Module):
    """The base network exactly as the seed README describes it (about 6.4M parameters).

    3x3 convs of 32, 64 (padding 1), 2x2 max-pool, 128, 256 (padding 1), 2x2 max-pool, 512, 1024
    (no padding: 7 -> 5 -> 3), 10 (3 -> 1); ReLU after each conv but the last; log-softmax.
    `widths`: the first six convs' channels.
    """

    def __init__(self, widths: tuple[int, ...] = MODELS["seednet"].widths):
        super().__init__()
        w1, w2, w3, w4, w5, w6 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.conv5 = nn.Conv2d(w4, w5, 3)
        self.conv6 = nn.Conv2d(w5, w6, 3)
        self.conv7 = nn.Conv2d(w6, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        x = self.conv7(F.relu(self.conv6(F.relu(self.conv5(x)))))
        return F.log_softmax(x.flatten(1), dim=1)


def create_model(name: str, dropout: float = 0.05,
                 widths: tuple[int, ...] | None = None) -> nn.Module:
    """A fresh model `name` of the table (`flax_impl.common.models`), at `widths` (default: its
    own)."""
    family, widths = model_spec(name).family, model_widths(name, widths)
    if family == "seednet":  # no dropout
        return SeedNet(widths)
    return Net(dropout, widths)
