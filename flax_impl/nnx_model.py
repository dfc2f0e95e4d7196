"""The network in Flax NNX: `Net`, the layers and names of `flax_impl.model`.

NNX modules hold their variables: ``model = create_model("net", rngs=nnx.Rngs(0))`` draws the
weights from the ``params`` stream and gives each dropout layer its own fork of the ``dropout``
stream. ``model.train()`` / ``model.eval()`` switch dropout and BatchNorm; ``model(x)`` gives the
(B, 10) log-probabilities of float32 NHWC (B, 28, 28, 1) inputs, updating BatchNorm's running
statistics in place while training. Its parameters and statistics have linen's names and shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl.common.models import MODELS, NET_LAYOUT, conv_layers, model_spec, model_widths
from flax_impl.model import batch_normalize, torch_default_bias_init, torch_default_init


class BatchNorm(nnx.Module):
    """BatchNorm with PyTorch's conventions (unbiased running variance, torch's momentum), as
    `flax_impl.model.BatchNorm`; `nnx.BatchNorm` keeps the biased variance. `use_running_average`
    is what `model.train()` / `model.eval()` set."""

    def __init__(self, features: int, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))
        self.mean = nnx.BatchStat(jnp.zeros((features,)))
        self.var = nnx.BatchStat(jnp.ones((features,)))
        self.momentum, self.epsilon = momentum, epsilon
        self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            inv_std = jax.lax.rsqrt(self.var[...] + self.epsilon)
            return (x - self.mean[...]) * (inv_std * self.scale[...]) + self.bias[...]
        y, mean, var = batch_normalize(x, self.scale[...], self.bias[...], self.epsilon)
        self.mean[...] += self.momentum * (mean - self.mean[...])
        self.var[...] += self.momentum * (var - self.var[...])
        return y


class ConvBlock(nnx.Module):
    """Convolution (no bias; 3x3 or 1x1, depthwise where `groups` is the input's channels) ->
    BatchNorm -> ReLU -> channel dropout (whole feature maps); the convolution alone if not
    `normalized`."""

    def __init__(self, in_features: int, features: int, dropout: float, kernel_size: int = 3,
                 groups: int = 1, normalized: bool = True, *, rngs: nnx.Rngs,
                 conv_general_dilated: Callable = jax.lax.conv_general_dilated):
        self.conv = nnx.Conv(in_features, features, (kernel_size, kernel_size), padding="VALID",
                             use_bias=False, feature_group_count=groups,
                             kernel_init=torch_default_init,
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.normalized = normalized
        if normalized:
            self.bn = BatchNorm(features)
            self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return self.dropout(nnx.relu(self.bn(x))) if self.normalized else x


class Net(nnx.Module):
    """Our small CNNs, as `flax_impl.model.Net`: the conv blocks and max-pools of `layout` at
    `widths` (the model table), global average pooling, a linear head."""

    def __init__(self, dropout: float = 0.05, widths: tuple[int, ...] = MODELS["net"].widths,
                 layout: tuple[str, ...] = NET_LAYOUT, *, rngs: nnx.Rngs,
                 conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 max_pool: Callable = nnx.max_pool):
        plan = conv_layers(layout, widths)
        for layer in plan:
            if layer != "M":
                block = ConvBlock(layer.in_features, layer.features,
                                  dropout if layer.dropout else 0.0, layer.kernel_size,
                                  layer.groups, layer.normalized, rngs=rngs,
                                  conv_general_dilated=conv_general_dilated)
                setattr(self, layer.name, block)
        features = [layer for layer in plan if layer != "M"][-1].features
        self.head = nnx.Linear(features, 10, kernel_init=torch_default_init,
                               bias_init=torch_default_bias_init(features), rngs=rngs)
        self.plan = tuple("M" if layer == "M" else layer.name for layer in plan)
        self.max_pool = max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.plan:
            x = self.max_pool(x, (2, 2), strides=(2, 2)) if layer == "M" else getattr(self, layer)(x)
        return nnx.log_softmax(self.head(x.mean(axis=(1, 2))))


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None, *,
                 rngs: nnx.Rngs, conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 max_pool: Callable = nnx.max_pool) -> Net:
    """NNX model `name` of the table (`flax_impl.common.models`) at `widths` (default: its
    own), with the convolution function `nnx.Conv` calls and the pooling given."""
    return Net(dropout, model_widths(name, widths), model_spec(name).layout, rngs=rngs,
               conv_general_dilated=conv_general_dilated, max_pool=max_pool)



def variables_of(model: nnx.Module) -> dict:
    """The model's parameters and statistics as linen's variables (the same names and shapes),
    {"params", "batch_stats"}."""
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
