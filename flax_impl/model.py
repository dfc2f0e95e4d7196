"""The network in Flax linen: `Net`, < 20k parameters, at the widths of the model table.

Mirrors `torch_ref/model.py` layer for layer and name for name: float32 NHWC (B, 28, 28, 1) in,
(B, 10) log-probabilities out. The convolution and the max-pool are fields, as Flax's ImageNet
`ResNet` takes `conv`: `nn.Conv` and `nn.max_pool`, or the CPU kernels of `flax_impl.extras`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_impl.common.data import normalize
from flax_impl.common.models import MODELS, NET_LAYOUT, conv_layers, model_spec, model_widths

ModuleDef = Any

# PyTorch's default initialisation (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)), so both
# frameworks start from the same distribution.
torch_default_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias initialisation: U(+-1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


def to_inputs(images: jax.Array, augment: Callable | None = None) -> jax.Array:
    """uint8 (B, 28, 28) -> the model's input, float32 (B, 28, 28, 1) normalised; `augment`
    transforms the [0, 1] pixels first (what a rotation brings in from outside is black)."""
    pixels = images[..., None].astype(jnp.float32) / 255.0
    return normalize(augment(pixels) if augment else pixels)


def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """`x` normalised with its batch statistics over all axes but the last (the biased variance,
    as torch trains), then scaled and shifted: (normalised x, batch mean, unbiased batch
    variance: what torch's running average keeps)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    count = x.size // x.shape[-1]
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return y, mean, var * count / (count - 1)


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
            y, mean, var = batch_normalize(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                running_mean.value += self.momentum * (mean - running_mean.value)
                running_var.value += self.momentum * (var - running_var.value)
            return y
        mean, var = running_mean.value, running_var.value
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class ConvBlock(nn.Module):
    """Convolution (no bias; 3x3 or 1x1, depthwise where `groups` is the input's channels) ->
    BatchNorm -> ReLU -> channel dropout (whole feature maps); the convolution alone if not
    `normalized`."""

    features: int
    dropout: float
    conv: ModuleDef = nn.Conv
    kernel_size: int = 3
    groups: int = 1
    normalized: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        size = (self.kernel_size, self.kernel_size)
        x = self.conv(self.features, size, padding="VALID", use_bias=False,
                      feature_group_count=self.groups, kernel_init=torch_default_init,
                      name="conv")(x)
        if not self.normalized:
            return x
        x = nn.relu(BatchNorm(name="bn")(x, train))
        # Dropping whole channels (torch's Dropout2d) draws B*C random numbers instead of B*H*W*C:
        # random bits are slow on XLA:CPU.
        return nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)


class Net(nn.Module):
    """Our small CNNs: the conv blocks and max-pools of `layout` at `widths` (the model table,
    `flax_impl.common.models`), global average pooling, a linear head.

    `Net`'s own layout (NET_LAYOUT) is six 3x3 conv blocks and one max-pool; TinyNet and WideNet
    are that network, narrower and wider; SepNet and XSepNet other layouts, of depthwise-separable
    blocks.
    """

    dropout: float = 0.05
    widths: tuple[int, ...] = MODELS["net"].widths
    layout: tuple[str, ...] = NET_LAYOUT
    conv: ModuleDef = nn.Conv
    max_pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for layer in conv_layers(self.layout, self.widths):
            if layer == "M":
                x = self.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = ConvBlock(layer.features, self.dropout if layer.dropout else 0.0, self.conv,
                          layer.kernel_size, layer.groups, layer.normalized,
                          name=layer.name)(x, train)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(10, kernel_init=torch_default_init,
                     bias_init=torch_default_bias_init(x.shape[-1]), name="head")(x)
        return nn.log_softmax(x)


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None,
                 conv: ModuleDef = nn.Conv, max_pool: Callable = nn.max_pool) -> Net:
    """Model `name` of the table (`flax_impl.common.models`) at `widths` (default: its own), with
    the convolution and pooling given (default: `nn.Conv`, `nn.max_pool`)."""
    return Net(dropout=dropout, widths=model_widths(name, widths), layout=model_spec(name).layout,
               conv=conv, max_pool=max_pool)
