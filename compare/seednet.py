"""The seed README's network, `SeedNet`, in Flax linen, Flax NNX and PyTorch.

The README the project started from describes 3x3 convs of 32, 64, a max-pool, 128, 256, a
max-pool, 512, 1024 and 10, and claims fewer than 20,000 parameters: it has about 6.4 million.
It is kept here, out of the port, for the proof: `compare.params` counts it and `compare.parity`
converts its weights both ways (convolutions with biases and padding, which `Net` has not).
Padding 1 for the first four convs, none after (7 -> 5 -> 3 -> 1); ReLU after every conv but the
last; log-softmax.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import torch
import torch.nn.functional as F
from flax import nnx

from flax_impl.common.models import SEEDNET_WIDTHS
from flax_impl.model import torch_default_bias_init, torch_default_init

PADDING = (1, 1, 1, 1, 0, 0, 0)  # of conv1 ... conv7


def channels(widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(in, out) channels of conv1 ... conv7."""
    sizes = (1, *widths, 10)
    return list(zip(sizes[:-1], sizes[1:], strict=True))


class LinenSeedNet(nn.Module):
    """SeedNet in Flax linen, NHWC; convs named conv1 ... conv7."""

    widths: tuple[int, ...] = SEEDNET_WIDTHS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or BatchNorm
        for i, ((in_features, features), pad) in enumerate(zip(channels(self.widths), PADDING,
                                                                strict=True)):
            x = nn.Conv(features, (3, 3), padding=((pad, pad), (pad, pad)),
                        kernel_init=torch_default_init,
                        bias_init=torch_default_bias_init(9 * in_features), name=f"conv{i + 1}")(x)
            x = nn.relu(x) if i < 6 else x
            x = nn.max_pool(x, (2, 2), strides=(2, 2)) if i in (1, 3) else x
        return nn.log_softmax(x.reshape(x.shape[0], -1))


class NnxSeedNet(nnx.Module):
    """SeedNet in Flax NNX, the names and layout of `LinenSeedNet`."""

    def __init__(self, widths: tuple[int, ...] = SEEDNET_WIDTHS, *, rngs: nnx.Rngs):
        for i, ((in_features, features), pad) in enumerate(zip(channels(widths), PADDING,
                                                                strict=True)):
            setattr(self, f"conv{i + 1}", nnx.Conv(
                in_features, features, (3, 3), padding=((pad, pad), (pad, pad)),
                kernel_init=torch_default_init, bias_init=torch_default_bias_init(9 * in_features),
                rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(7):
            x = getattr(self, f"conv{i + 1}")(x)
            x = nnx.relu(x) if i < 6 else x
            x = nnx.max_pool(x, (2, 2), strides=(2, 2)) if i in (1, 3) else x
        return nnx.log_softmax(x.reshape(x.shape[0], -1))


class TorchSeedNet(torch.nn.Module):
    """SeedNet in PyTorch, NCHW, the names of `LinenSeedNet`."""

    def __init__(self, widths: tuple[int, ...] = SEEDNET_WIDTHS):
        super().__init__()
        for i, ((in_features, features), pad) in enumerate(zip(channels(widths), PADDING,
                                                                strict=True)):
            setattr(self, f"conv{i + 1}", torch.nn.Conv2d(in_features, features, 3, padding=pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(7):
            x = getattr(self, f"conv{i + 1}")(x)
            x = F.relu(x) if i < 6 else x
            x = F.max_pool2d(x, 2) if i in (1, 3) else x
        return F.log_softmax(x.flatten(1), dim=1)
