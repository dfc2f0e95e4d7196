"""flax_impl.extras.kernels: the kernels are passed into the port by construction, and the stock
Flax operations and the fast CPU kernels build equal models and equal runs."""

from __future__ import annotations

import dataclasses
from collections import Counter

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
from flax_impl.model import create_model
from tests.conftest import SHAPE_BATCH_SIZE, SHAPE_EPOCHS, SHAPE_STEPS_PER_CALL, normal


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


def linen_loss_and_grads(kernels: Kernels, dtype) -> tuple:
    x = normal(0, (8, 28, 28, 1), dtype)
    model = create_model("net", 0.0, conv=kernels.conv, max_pool=kernels.max_pool)

    @jax.jit
    def loss_and_grads(x):
        variables = jax.tree.map(lambda v: v.astype(dtype), model.init(jax.random.key(1), x))

        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(out * jnp.arange(10.0, dtype=dtype))

        return jax.value_and_grad(loss)(variables["params"])

    return loss_and_grads(x)


def nnx_loss_and_grads(kernels: Kernels, dtype) -> tuple:
    x = normal(0, (8, 28, 28, 1), dtype)

    @jax.jit
    def loss_and_grads(x):
        model = nnx_model.create_model("net", 0.0, rngs=nnx.Rngs(1), max_pool=kernels.max_pool,
                                       conv_general_dilated=kernels.conv_general_dilated)

        def loss(model):
            return jnp.sum(model(x) * jnp.arange(10.0, dtype=dtype))

        return nnx.value_and_grad(loss)(model)

    return loss_and_grads(x)


# The kernels' maths in float64 (float32 as they train: test_a_short_run_...); NNX calls the
# convolution through nnx.Conv, another path than linen's, which float32 suffices to check.
@pytest.mark.slow
@pytest.mark.parametrize("api, dtype", [("linen", np.float64), ("nnx", np.float32)])
def test_stock_and_fast_models_give_equal_outputs_and_gradients(api, dtype):
    loss_and_grads = linen_loss_and_grads if api == "linen" else nnx_loss_and_grads
    with jax.enable_x64(dtype == np.float64):
        (stock_loss, stock_grads), (fast_loss, fast_grads) = (
            loss_and_grads(kernels, dtype) for kernels in (STOCK, FAST))
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(fast_loss, stock_loss, rtol=tolerance)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(stock_grads), strict=True):
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)


@pytest.mark.slow
def test_a_short_run_gives_equal_metrics_with_either_kernels(tiny_idx_source):
    # The suite's run shape (conftest.FLAX_SHAPE): the fast run's programs are the other tests'.
    config = Config(data_source=tiny_idx_source, epochs=SHAPE_EPOCHS, batch_size=SHAPE_BATCH_SIZE)
    stock, quick = (flax_train.train(config, steps_per_call=SHAPE_STEPS_PER_CALL, kernels=kernels)
                    for kernels in ("stock", "fast"))
    # Same batches, keys and maths; float32 rounding differs (other summation orders) and the
    # steps at the peak learning rate amplify it to a few parts in a thousand.
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose([m[key] for m in quick], [m[key] for m in stock], rtol=1e-2)
    assert abs(quick[-1]["test_accuracy"] - stock[-1]["test_accuracy"]) <= 2 / 200
