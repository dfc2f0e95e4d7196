"""The networks in Flax linen: `Net` (ours, < 20k parameters) and `SeedNet` (the seed README's).

Mirrors `torch_ref/model.py` layer for layer and name for name. Input: float32 NHWC (B, 28, 28, 1),
normalised with `flax_impl.data.normalize`. Output: (B, 10) log-probabilities.

Usage: ``variables = Net().init(rngs, x, train=False)`` gives ``{"params", "batch_stats"}``;
``Net().apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])`` trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_impl.conv import conv_general_dilated
from flax_impl.pool import max_pool

# PyTorch's default initialisation (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)), so both
# frameworks start from the same distribution.
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias initialisation: U(+-1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


def Conv(features: int, in_features: int, padding: str | int = "VALID", use_bias: bool = True,
         name: str | None = None) -> nn.Conv:
    """A 3x3 stride-1 `nn.Conv` with torch's initialisation and our fast-backward convolution."""
    padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (3, 3), padding=padding, use_bias=use_bias,
                   kernel_init=torch_default_init,
                   bias_init=torch_default_bias_init(9 * in_features),
                   conv_general_dilated=conv_general_dilated, name=name)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's conventions, so converted torch weights behave identically.

    Normalises with the biased batch variance while training (as both frameworks do), but keeps the
    *unbiased* variance in its running average and uses torch's momentum (new = (1-m) old + m batch),
    as `torch.nn.BatchNorm2d` does; `flax.linen.BatchNorm` keeps the biased one.
    Variables: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            if not self.is_initializing():
                count = x.size // features
                running_mean.value += self.momentum * (mean - running_mean.value)
                running_var.value += self.momentum * (var * count / (count - 1) - running_var.value)
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class ConvBlock(nn.Module):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU -> channel dropout (whole feature maps)."""

    in_features: int
    features: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.in_features, use_bias=False, name="conv")(x)
        x = nn.relu(BatchNorm(name="bn")(x, train))
        # Dropping whole channels (torch's Dropout2d) draws B*C random numbers instead of B*H*W*C:
        # random bits are slow on XLA:CPU.
        dropout = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)
        return dropout(x) if self.dropout else x


class Net(nn.Module):
    """Our sub-20k CNN: six 3x3 conv blocks, one max-pool, global average pooling, a linear head.

    Spatial sizes 28 -> 26 -> 24 -> (pool) 12 -> 10 -> 8 -> 6 -> 4 -> (GAP) 1; receptive field 22.
    """

    dropout: float = 0.05

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = ConvBlock(1, 10, self.dropout, name="block1")(x, train)
        x = ConvBlock(10, 16, self.dropout, name="block2")(x, train)
        x = max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(16, 16, self.dropout, name="block3")(x, train)
        x = ConvBlock(16, 16, self.dropout, name="block4")(x, train)
        x = ConvBlock(16, 24, self.dropout, name="block5")(x, train)
        x = ConvBlock(24, 32, 0.0, name="block6")(x, train)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(10, kernel_init=torch_default_init, bias_init=torch_default_bias_init(32),
                     name="head")(x)
        return nn.log_softmax(x)


class SeedNet(nn.Module):
    """The base network exactly as the seed README describes it (about 6.4M parameters).

    3x3 convs of 32, 64 (padding 1), 2x2 max-pool, 128, 256 (padding 1), 2x2 max-pool, 512, 1024
    (no padding: 7 -> 5 -> 3), 10 (3 -> 1); ReLU after each conv but the last; log-softmax.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or BatchNorm
        x = nn.relu(Conv(32, 1, padding=1, name="conv1")(x))
        x = nn.relu(Conv(64, 32, padding=1, name="conv2")(x))
        x = max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(Conv(128, 64, padding=1, name="conv3")(x))
        x = nn.relu(Conv(256, 128, padding=1, name="conv4")(x))
        x = max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(Conv(512, 256, name="conv5")(x))
        x = nn.relu(Conv(1024, 512, name="conv6")(x))
        x = Conv(10, 1024, name="conv7")(x)
        return nn.log_softmax(x.reshape(x.shape[0], -1))


def create_model(name: str, dropout: float = 0.05) -> nn.Module:
    """A model by name ("net" or "seednet")."""
    return Net(dropout) if name == "net" else SeedNet()
