"""flax_impl.extras.kernels: the kernels are passed into the port by construction, and the stock
Flax operations and the fast CPU kernels build equal layers (equal runs: tests/test_flax_train.py)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_impl import augment, nnx_model
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.extras import fast
from flax_impl.extras.kernels import FAST, STOCK, Kernels, get_kernels
from flax_impl.model import ConvBlock
from tests.conftest import normal


def test_auto_is_fast_on_cpu_and_stock_elsewhere():
    assert get_kernels("auto", "cpu") is FAST
    assert get_kernels("auto", "gpu") is get_kernels("auto", "tpu") is STOCK
    assert get_kernels("stock", "cpu") is STOCK and get_kernels("fast", "gpu") is FAST
    assert get_kernels("auto") is (FAST if jax.default_backend() == "cpu" else STOCK)
    variant = dataclasses.replace(FAST, name="mine")
    assert get_kernels(variant) is variant  # a Kernels is taken as it is
    with pytest.raises(ValueError, match="unknown kernels 'quick'"):
        get_kernels("quick")


def test_stock_kernels_are_plain_flax_and_fast_ones_the_cpu_kernels():
    assert STOCK.conv is nn.Conv and STOCK.conv_general_dilated is jax.lax.conv_general_dilated
    assert STOCK.max_pool is nn.max_pool and STOCK.rotate is augment.rotate
    assert FAST.conv.func is nn.Conv
    assert FAST.conv.keywords == {"conv_general_dilated": fast.conv_general_dilated}
    assert FAST.conv_general_dilated is fast.conv_general_dilated
    assert FAST.max_pool is fast.max_pool and FAST.rotate is fast.rotate


def spying(kernels: Kernels, seen: Counter) -> Kernels:
    """`kernels` with each operation counting its calls in `seen`: a variant is a Kernels with
    fields replaced, nothing patched."""

    def counted(name, operation):
        def call(*args, **kwargs):
            seen[name] += 1
            return operation(*args, **kwargs)

        return call

    return dataclasses.replace(kernels, name="spy",
                               conv_general_dilated=counted("conv", kernels.conv_general_dilated),
                               max_pool=counted("max_pool", kernels.max_pool),
                               rotate=counted("rotate", kernels.rotate))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_the_port_runs_the_kernels_it_is_constructed_with(api):
    seen = Counter()
    port = flax_train.create_port(Config(api=api, batch_size=8), 10, spying(FAST, seen))
    state = jax.eval_shape(port.init, jax.random.key(0))  # traced, not run: no compilation
    batch = (jnp.zeros((8, 28, 28), jnp.uint8), jnp.zeros((8,), jnp.int32))
    seen.clear()
    jax.eval_shape(port.train_step, state, batch, jax.random.key(1))
    assert seen == {"conv": 6, "max_pool": 1, "rotate": 1}  # six blocks, one pool
    seen.clear()
    jax.eval_shape(port.log_probs, state, jnp.zeros((8, 28, 28, 1)))
    assert seen == {"conv": 6, "max_pool": 1}
    assert FAST.max_pool is fast.max_pool and FAST.name == "fast"  # the original is untouched


class LinenBlocks(nn.Module):
    """Net's first two blocks and its pool, in linen, with the convolution and pool given."""

    conv: Any
    max_pool: Any

    @nn.compact
    def __call__(self, x):
        x = ConvBlock(10, 0.0, self.conv)(x, True)
        x = ConvBlock(16, 0.0, self.conv)(x, True)
        return self.max_pool(x, (2, 2), strides=(2, 2))


class NnxBlocks(nnx.Module):
    """Net's first two blocks and its pool, in NNX, with the convolution and pool given."""

    def __init__(self, kernels: Kernels, rngs: nnx.Rngs):
        conv = kernels.conv_general_dilated
        self.block1 = nnx_model.ConvBlock(1, 10, 0.0, rngs=rngs, conv_general_dilated=conv)
        self.block2 = nnx_model.ConvBlock(10, 16, 0.0, rngs=rngs, conv_general_dilated=conv)
        self.max_pool = kernels.max_pool

    def __call__(self, x):
        return self.max_pool(self.block2(self.block1(x)), (2, 2), strides=(2, 2))


def loss_and_grads(api: str, kernels: Kernels, x: np.ndarray, weights: np.ndarray):
    """A weighted sum of the blocks' train-mode output, and its gradients by the parameters and
    the input."""
    if api == "linen":
        model = LinenBlocks(kernels.conv, kernels.max_pool)

        @jax.jit
        def run(x):
            variables = model.init(jax.random.key(1), x)

            def loss(params, x):
                out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
                return jnp.sum(out * weights)

            return jax.value_and_grad(loss, (0, 1))(variables["params"], x)
    else:
        @jax.jit
        def run(x):
            def loss(model, x):
                return jnp.sum(model(x) * weights)

            return nnx.value_and_grad(loss, argnums=(0, 1))(NnxBlocks(kernels, nnx.Rngs(1)), x)
    return run(x)


# The blocks of the two paths of the fast convolution (one input channel; more) and the pool,
# in each API: nnx.Conv calls the convolution function itself, linen's nn.Conv is given it.
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_stock_and_fast_blocks_give_equal_outputs_and_gradients(api):
    x, weights = normal(0, (4, 28, 28, 1)), normal(1, (4, 12, 12, 16))
    (stock_loss, stock_grads), (fast_loss, fast_grads) = (
        loss_and_grads(api, kernels, x, weights) for kernels in (STOCK, FAST))
    # The same maths, summed in other orders (convolutions of up to 144 products, a loss over
    # 9,216 outputs): float32 rounding, about 1e-6 relative at most; 1e-5 bounds it on any CPU.
    np.testing.assert_allclose(fast_loss, stock_loss, rtol=1e-5)
    leaves = jax.tree.leaves(stock_grads)
    assert len(leaves) == 7  # the input, two kernels, two scales and biases
    for got, want in zip(jax.tree.leaves(fast_grads), leaves, strict=True):
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
