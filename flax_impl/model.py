"""The networks in Flax linen: `Net` (ours, < 20k parameters) and `SeedNet` (the seed README's).

Mirrors `torch_ref/model.py` layer for layer and name for name. Input: float32 NHWC (B, 28, 28, 1),
`to_inputs(uint8 images)`. Output: (B, 10) log-probabilities.

Usage: ``model = create_model("net")``; ``variables = model.init(key, x, train=False)`` gives
``{"params", "batch_stats"}``; ``model.apply(variables, x, train=True, rngs={"dropout": key},
mutable=["batch_stats"])`` trains. The convolution, max-pool and batch normalisation are fields
(`conv`, `max_pool`, `normalize`): plain `nn.Conv`, `nn.max_pool` and `batch_normalize` by
default; a drop-in (the optional CPU kernels of `flax_impl.extras`) is passed in by
construction, as Flax's ImageNet `ResNet` takes `conv`.
The networks' widths come from the model table, `flax_impl.common.models`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_impl.common.data import normalize
from flax_impl.common.models import MODELS, model_spec, model_widths

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
    """uint8 (B, 28, 28) -> the model's input, float32 (B, 28, 28, 1) normalised.

    `augment`, if given, transforms the [0, 1] pixels before normalisation (so that what a
    rotation brings in from outside the image is black).
    """
    pixels = images[..., None].astype(jnp.float32) / 255.0
    return normalize(augment(pixels) if augment else pixels)


def conv3x3(conv: ModuleDef, features: int, in_features: int, padding: int = 0,
            use_bias: bool = True, name: str | None = None) -> nn.Module:
    """A 3x3 stride-1 `conv` (an `nn.Conv` or a drop-in) with torch's initialisation."""
    return conv(features, (3, 3), padding=((padding, padding), (padding, padding)),
                use_bias=use_bias, kernel_init=torch_default_init,
                bias_init=torch_default_bias_init(9 * in_features), name=name)


def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`x` normalised with its batch statistics over all axes but the last (the biased
    variance, as torch trains), then scaled and shifted: (normalised x, batch mean, unbiased
    batch variance, what torch's running average keeps)."""
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
    Variables: params ``scale``, ``bias``; batch_stats ``mean``, ``var``. `normalize`: how the
    training batch is normalised (`batch_normalize`, or a drop-in with its signature).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    normalize: Callable = batch_normalize

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        if train:
            y, mean, var = self.normalize(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                running_mean.value += self.momentum * (mean - running_mean.value)
                running_var.value += self.momentum * (var - running_var.value)
            return y
        mean, var = running_mean.value, running_var.value
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


def whole_batch_dropout(dropout: Callable, x: jax.Array, rate: float, batch_axis: str
                        ) -> jax.Array:
    """Channel `dropout` (a Dropout with `rate` dropping whole feature maps, called on an
    array) of this device's rows of a batch spread over the devices of `batch_axis`, inside
    `jax.shard_map`: the whole batch's mask, drawn as one device draws it (B * C numbers), and
    this device's rows of it, so that the devices train as one."""
    rows, devices = x.shape[0], jax.lax.psum(1, batch_axis)
    kept = dropout(jnp.ones((rows * devices, 1, 1, x.shape[-1]), x.dtype))
    mine = jax.lax.dynamic_slice_in_dim(kept, jax.lax.axis_index(batch_axis) * rows, rows)
    return jnp.where(mine != 0, x / (1.0 - rate), jnp.zeros_like(x))


class ConvBlock(nn.Module):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU -> channel dropout (whole feature maps).
    `batch_axis`: see `Net`."""

    in_features: int
    features: int
    dropout: float
    conv: ModuleDef = nn.Conv
    normalize: Callable = batch_normalize
    batch_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv3x3(self.conv, self.features, self.in_features, use_bias=False, name="conv")(x)
        x = nn.relu(BatchNorm(normalize=self.normalize, name="bn")(x, train))
        # Dropping whole channels (torch's Dropout2d) draws B*C random numbers instead of B*H*W*C:
        # random bits are slow on XLA:CPU.
        dropout = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)
        if not (self.dropout and train):
            return x
        if self.batch_axis is None:
            return dropout(x)
        return whole_batch_dropout(dropout, x, self.dropout, self.batch_axis)


class Net(nn.Module):
    """Our sub-20k CNN: six 3x3 conv blocks, one max-pool, global average pooling, a linear head.

    Spatial sizes 28 -> 26 -> 24 -> (pool) 12 -> 10 -> 8 -> 6 -> 4 -> (GAP) 1; receptive field 22.
    `widths`: the blocks' channels; TinyNet and WideNet are the same network, narrower and wider
    (the model table, `flax_impl.common.models`). `batch_axis`: applied inside `jax.shard_map`
    to this device's rows of a batch spread over that mesh axis, the dropout masks are the whole
    batch's (and `normalize` must normalise over the whole batch too).
    """

    dropout: float = 0.05
    widths: tuple[int, ...] = MODELS["net"].widths
    conv: ModuleDef = nn.Conv
    max_pool: Callable = nn.max_pool
    normalize: Callable = batch_normalize
    batch_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block = functools.partial(ConvBlock, conv=self.conv, normalize=self.normalize,
                                  batch_axis=self.batch_axis)
        w1, w2, w3, w4, w5, w6 = self.widths
        x = block(1, w1, self.dropout, name="block1")(x, train)
        x = block(w1, w2, self.dropout, name="block2")(x, train)
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        x = block(w2, w3, self.dropout, name="block3")(x, train)
        x = block(w3, w4, self.dropout, name="block4")(x, train)
        x = block(w4, w5, self.dropout, name="block5")(x, train)
        x = block(w5, w6, 0.0, name="block6")(x, train)
        x = x.mean(axis=(1, 2))
        x = nn.Dense(10, kernel_init=torch_default_init, bias_init=torch_default_bias_init(w6),
                     name="head")(x)
        return nn.log_softmax(x)


class SeedNet(nn.Module):
    """The base network exactly as the seed README describes it (about 6.4M parameters).

    3x3 convs of 32, 64 (padding 1), 2x2 max-pool, 128, 256 (padding 1), 2x2 max-pool, 512, 1024
    (no padding: 7 -> 5 -> 3), 10 (3 -> 1); ReLU after each conv but the last; log-softmax.
    `widths`: the first six convs' channels.
    """

    widths: tuple[int, ...] = MODELS["seednet"].widths
    conv: ModuleDef = nn.Conv
    max_pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or BatchNorm
        conv = functools.partial(conv3x3, self.conv)
        w1, w2, w3, w4, w5, w6 = self.widths
        x = nn.relu(conv(w1, 1, padding=1, name="conv1")(x))
        x = nn.relu(conv(w2, w1, padding=1, name="conv2")(x))
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(w3, w2, padding=1, name="conv3")(x))
        x = nn.relu(conv(w4, w3, padding=1, name="conv4")(x))
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(conv(w5, w4, name="conv5")(x))
        x = nn.relu(conv(w6, w5, name="conv6")(x))
        x = conv(10, w6, name="conv7")(x)
        return nn.log_softmax(x.reshape(x.shape[0], -1))


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None,
                 conv: ModuleDef = nn.Conv, max_pool: Callable = nn.max_pool,
                 normalize: Callable = batch_normalize, batch_axis: str | None = None
                 ) -> nn.Module:
    """Model `name` of the table (`flax_impl.common.models`), at `widths` (default: its own),
    with the convolution, pooling and batch normalisation given (default: `nn.Conv`,
    `nn.max_pool`, `batch_normalize`); `batch_axis`: see `Net`."""
    family, widths = model_spec(name).family, model_widths(name, widths)
    if family == "seednet":  # no dropout or BatchNorm
        return SeedNet(widths=widths, conv=conv, max_pool=max_pool)
    return Net(dropout=dropout, widths=widths, conv=conv, max_pool=max_pool, normalize=normalize,
               batch_axis=batch_axis)
