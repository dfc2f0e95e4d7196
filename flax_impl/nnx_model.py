"""The networks in Flax NNX: `Net` and `SeedNet`, the same layers and names as `flax_impl.model`.

NNX modules hold their variables: ``model = create_model("net", key=jax.random.key(0))``;
``model(x)`` evaluates, ``model(x, train=True, dropout_key=key)`` trains (BatchNorm's running
statistics updated in place). Input: float32 NHWC (B, 28, 28, 1); output: (B, 10)
log-probabilities.

Their state is linen's variables: ``nnx.split(model, nnx.Param, nnx.BatchStat)`` gives, as pure
dicts, the ``{"params", "batch_stats"}`` trees `flax_impl.model` has (same names, same shapes), and
one key initialises both APIs to the same weights: each variable is drawn with the key linen's
`init` gives it (the key folded with the variable's path), and channel dropout with the key linen's
`nn.Dropout` draws. `SplitModel` gives an NNX network linen's `init`/`apply`, so the functional
core (`flax_impl.core`) trains it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.scope import LazyRng

from flax_impl.common.models import MODELS, model_spec, model_widths
from flax_impl.model import batch_normalize, torch_default_bias_init, torch_default_init, whole_batch_dropout


def linen_key(key: jax.Array, *path: str | int) -> jax.Array:
    """The key linen derives from `key` at `path` (module names, then a counter): linen's `init`
    draws the n-th variable of module a/b with ``linen_key(key, "a", "b", n)``."""
    return LazyRng.create(key, *path).as_jax_rng()


def drawn_with(init: Callable, key: jax.Array) -> Callable:
    """`init`, drawing with `key` whatever key it is called with (NNX passes its own)."""
    return lambda _key, shape, dtype=jnp.float32: init(key, shape, dtype)


def conv3x3(in_features: int, features: int, key: jax.Array, path: tuple[str, ...],
            padding: int = 0, use_bias: bool = True,
            conv_general_dilated: Callable = jax.lax.conv_general_dilated) -> nnx.Conv:
    """A 3x3 stride-1 `nnx.Conv` with torch's initialisation, its variables drawn as linen's
    (the `rngs` NNX requires go unused: the initialisers bring their keys)."""
    return nnx.Conv(in_features, features, (3, 3), padding=((padding, padding), (padding, padding)),
                    use_bias=use_bias, kernel_init=drawn_with(torch_default_init,
                                                              linen_key(key, *path, 1)),
                    bias_init=drawn_with(torch_default_bias_init(9 * in_features),
                                         linen_key(key, *path, 2)),
                    conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))


class BatchNorm(nnx.Module):
    """BatchNorm with PyTorch's conventions (unbiased running variance, torch's momentum), as
    `flax_impl.model.BatchNorm`; `nnx.BatchNorm` keeps the biased variance.
    Params ``scale``, ``bias``; batch statistics ``mean``, ``var``. `normalize`: how the training
    batch is normalised (`flax_impl.model.batch_normalize`, or a drop-in)."""

    def __init__(self, features: int, momentum: float = 0.1, epsilon: float = 1e-5,
                 normalize: Callable = batch_normalize):
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))
        self.mean = nnx.BatchStat(jnp.zeros((features,)))
        self.var = nnx.BatchStat(jnp.ones((features,)))
        self.momentum, self.epsilon, self.normalize = momentum, epsilon, normalize

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if train:
            y, mean, var = self.normalize(x, self.scale[...], self.bias[...], self.epsilon)
            self.mean[...] += self.momentum * (mean - self.mean[...])
            self.var[...] += self.momentum * (var - self.var[...])
            return y
        mean, var = self.mean[...], self.var[...]
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]


class ConvBlock(nnx.Module):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU -> channel dropout (whole feature maps)."""

    def __init__(self, in_features: int, features: int, dropout: float, key: jax.Array,
                 name: str, conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 normalize: Callable = batch_normalize, batch_axis: str | None = None):
        self.conv = conv3x3(in_features, features, key, (name, "conv"), use_bias=False,
                            conv_general_dilated=conv_general_dilated)
        self.bn = BatchNorm(features, normalize=normalize)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2)) if dropout else None
        self.name, self.batch_axis = name, batch_axis

    def __call__(self, x: jax.Array, train: bool, dropout_key: jax.Array | None) -> jax.Array:
        x = nnx.relu(self.bn(self.conv(x), train))
        if self.dropout is None or not train:
            return x
        # linen's nn.Dropout inside block N is module "Dropout_0" of "blockN": its first key
        dropout = functools.partial(self.dropout, deterministic=False,
                                    rngs=linen_key(dropout_key, self.name, "Dropout_0", 1))
        if self.batch_axis is None:
            return dropout(x)
        return whole_batch_dropout(dropout, x, self.dropout.rate, self.batch_axis)


class Net(nnx.Module):
    """Our sub-20k CNN, as `flax_impl.model.Net`: six 3x3 conv blocks, one max-pool, global
    average pooling, a linear head. `widths`: the blocks' channels (the model table);
    `batch_axis`: as `flax_impl.model.Net`'s."""

    def __init__(self, dropout: float = 0.05, widths: tuple[int, ...] = MODELS["net"].widths, *,
                 key: jax.Array, conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 max_pool: Callable = nnx.max_pool, normalize: Callable = batch_normalize,
                 batch_axis: str | None = None):
        w1, w2, w3, w4, w5, w6 = widths
        convs = dict(key=key, conv_general_dilated=conv_general_dilated, normalize=normalize,
                     batch_axis=batch_axis)
        self.block1 = ConvBlock(1, w1, dropout, name="block1", **convs)
        self.block2 = ConvBlock(w1, w2, dropout, name="block2", **convs)
        self.block3 = ConvBlock(w2, w3, dropout, name="block3", **convs)
        self.block4 = ConvBlock(w3, w4, dropout, name="block4", **convs)
        self.block5 = ConvBlock(w4, w5, dropout, name="block5", **convs)
        self.block6 = ConvBlock(w5, w6, 0.0, name="block6", **convs)
        self.head = nnx.Linear(w6, 10, kernel_init=drawn_with(torch_default_init,
                                                               linen_key(key, "head", 1)),
                               bias_init=drawn_with(torch_default_bias_init(w6),
                                                    linen_key(key, "head", 2)),
                               rngs=nnx.Rngs(0))
        self.max_pool = max_pool

    def __call__(self, x: jax.Array, train: bool = False,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        x = self.block1(x, train, dropout_key)
        x = self.block2(x, train, dropout_key)
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        for block in (self.block3, self.block4, self.block5, self.block6):
            x = block(x, train, dropout_key)
        return nnx.log_softmax(self.head(x.mean(axis=(1, 2))))


class SeedNet(nnx.Module):
    """The seed README's base network, as `flax_impl.model.SeedNet` (about 6.4M parameters)."""

    def __init__(self, widths: tuple[int, ...] = MODELS["seednet"].widths, *, key: jax.Array,
                 conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 max_pool: Callable = nnx.max_pool):
        w1, w2, w3, w4, w5, w6 = widths
        conv = lambda i, o, name, padding=0: conv3x3(  # noqa: E731
            i, o, key, (name,), padding, conv_general_dilated=conv_general_dilated)
        self.conv1, self.conv2 = conv(1, w1, "conv1", 1), conv(w1, w2, "conv2", 1)
        self.conv3, self.conv4 = conv(w2, w3, "conv3", 1), conv(w3, w4, "conv4", 1)
        self.conv5, self.conv6 = conv(w4, w5, "conv5"), conv(w5, w6, "conv6")
        self.conv7 = conv(w6, 10, "conv7")
        self.max_pool = max_pool

    def __call__(self, x: jax.Array, train: bool = False,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        del train, dropout_key  # no dropout or BatchNorm
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv4(nnx.relu(self.conv3(x))))
        x = self.max_pool(x, (2, 2), strides=(2, 2))
        x = self.conv7(nnx.relu(self.conv6(nnx.relu(self.conv5(x)))))
        return nnx.log_softmax(x.reshape(x.shape[0], -1))


def create_model(name: str, dropout: float = 0.05, widths: tuple[int, ...] | None = None, *,
                 key: jax.Array, conv_general_dilated: Callable = jax.lax.conv_general_dilated,
                 max_pool: Callable = nnx.max_pool, normalize: Callable = batch_normalize,
                 batch_axis: str | None = None) -> nnx.Module:
    """NNX model `name` of the table at `widths`, initialised from `key` as linen's `init(key)`
    initialises `flax_impl.model.create_model(name, ...)`."""
    family, widths = model_spec(name).family, model_widths(name, widths)
    if family == "seednet":
        return SeedNet(widths, key=key, conv_general_dilated=conv_general_dilated,
                       max_pool=max_pool)
    return Net(dropout, widths, key=key, conv_general_dilated=conv_general_dilated,
               max_pool=max_pool, normalize=normalize, batch_axis=batch_axis)


def split_variables(model: nnx.Module) -> dict:
    """The model's state as linen's variables: {"params": ..., "batch_stats": ...} (pure dicts;
    no "batch_stats" for a network without BatchNorm)."""
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    variables = {"params": nnx.to_pure_dict(params)}
    stats = nnx.to_pure_dict(batch_stats)
    return {**variables, "batch_stats": stats} if stats else variables


def merge_variables(graphdef: nnx.GraphDef, template: tuple[nnx.State, nnx.State],
                    variables: dict) -> nnx.Module:
    """A module of `graphdef` holding linen-style `variables` (checked against `template`, the
    module's own (params, batch_stats) states)."""
    states = []
    for state, collection in zip(template, ("params", "batch_stats"), strict=True):
        state = jax.tree.map(lambda leaf: leaf, state)  # a copy: it is filled in place
        nnx.replace_by_pure_dict(state, variables.get(collection, {}))
        states.append(state)
    return nnx.merge(graphdef, *states)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitModel:
    """An NNX network with linen's functional interface, for `flax_impl.core`:

    ``init(key, x, train=False)`` -> linen-style variables, and ``apply(variables, x, train=...,
    rngs={"dropout": key}, mutable=["batch_stats"])`` -> log-probabilities (and the updated
    statistics), the module merged from its state inside the traced function and split again.
    `build(key)` constructs the module (e.g. ``functools.partial(create_model, "net")``).
    """

    build: Callable[..., nnx.Module]
    graphdef: Any = None
    template: Any = None

    @classmethod
    def of(cls, build: Callable[..., nnx.Module]) -> SplitModel:
        """The SplitModel of `build`, its graph and state shapes found without computing."""
        abstract = nnx.eval_shape(lambda: build(key=jax.random.key(0)))
        graphdef, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
        return cls(build, graphdef, (params, batch_stats))

    def init(self, key: jax.Array, x: jax.Array, train: bool = False) -> dict:
        """The initial variables drawn from `key` (linen's `init`; `x` and `train` unused)."""
        del x, train
        return split_variables(self.build(key=key))

    def apply(self, variables: dict, x: jax.Array, train: bool = False, rngs: dict | None = None,
              mutable: Any = False):
        """linen's `apply`: the log-probabilities, and with `mutable` the new statistics."""
        model = merge_variables(self.graphdef, self.template, variables)
        out = model(x, train=train, dropout_key=(rngs or {}).get("dropout"))
        if not mutable:
            return out
        return out, {key: value for key, value in split_variables(model).items()
                     if key != "params"}
