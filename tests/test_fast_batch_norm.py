"""flax_impl.extras.fast.batch_norm: one reduction each way, the values and gradients of
flax_impl.model.batch_normalize."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compare.collectives import child_env
from flax_impl.core import jit_init
from flax_impl.extras import fast
from flax_impl.model import batch_normalize, create_model
from tests.conftest import normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inputs(shape=(6, 5, 5, 4), offset=3.0):
    x = normal(0, shape) * 2 + offset  # a mean far from 0: one-pass variance
    return x, normal(1, shape[-1:]), normal(2, shape[-1:]), normal(3, shape)


def weighted(normalize, weights):
    """A loss of all three outputs (the running averages use the mean and variance)."""
    def loss(x, scale, bias):
        y, mean, var = normalize(x, scale, bias, 1e-5)
        return jnp.sum(y * weights) + 0.3 * jnp.sum(mean ** 2) + 1.7 * jnp.sum(var)
    return loss


@pytest.mark.parametrize("shape, offset", [((6, 5, 5, 4), 3.0), ((2, 3, 3, 7), 0.0),
                                           ((16, 12), -1.0)])
def test_values_and_gradients_equal_the_stock_batch_norm(shape, offset):
    x, scale, bias, weights = inputs(shape, offset)
    for got, want in zip(jax.jit(fast.batch_normalize)(x, scale, bias, 1e-5),
                         jax.jit(batch_normalize)(x, scale, bias, 1e-5), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(weighted(f, weights), (0, 1, 2)))(x, scale, bias)
             for f in (fast.batch_normalize, batch_normalize)]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_each_direction_sums_the_batch_in_one_reduction():
    x, scale, bias, weights = inputs()

    def reductions(normalize) -> tuple[int, int]:
        """The sums in the forward pass and in the backward pass."""
        def forward(x, scale, bias):
            return normalize(x, scale, bias, 1e-5)

        _, backward = jax.vjp(forward, x, scale, bias)
        cotangents = (weights, scale, bias)  # any (y, mean, var)-shaped values
        return tuple(str(jax.make_jaxpr(f)(*args)).count("reduce_sum") for f, args in (
            (forward, (x, scale, bias)), (backward, (cotangents,))))

    assert reductions(fast.batch_normalize) == (1, 1)
    forward, backward = reductions(batch_normalize)
    assert forward == 2 and backward >= 2  # what it saves: the all-reduces across devices


@pytest.mark.slow
def test_a_network_trained_with_it_matches_the_stock_network():
    # float64: through six BatchNorm layers of a batch of 8, float32 rounding alone moves some
    # gradients by percents, and that differently from one XLA to the next.
    with jax.enable_x64(True):
        x = normal(1, (8, 28, 28, 1), np.float64)
        stock, lean = create_model("tinynet", 0.0), create_model(
            "tinynet", 0.0, normalize=fast.batch_normalize)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                                 jit_init(stock.init)(jax.random.key(2), x))

        def loss(model):
            def f(params):
                out, stats = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"])
                return jnp.sum(out * jnp.arange(10.0)), stats
            return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

        (got, got_stats), got_grads = loss(lean)
        (want, want_stats), want_grads = loss(stock)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for a, b in zip(jax.tree.leaves((got_stats, got_grads)),
                    jax.tree.leaves((want_stats, want_grads)), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


SPREAD_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from jax.sharding import Mesh, PartitionSpec as P
from flax_impl.extras import fast
from flax_impl.model import batch_normalize, whole_batch_dropout
from tests.test_fast_batch_norm import inputs, weighted
assert len(jax.devices()) == 2
mesh = Mesh(np.array(jax.devices()), ("data",))
x, scale, bias, weights = inputs((8, 5, 5, 4))
normalize = lambda *args: fast.batch_normalize(*args, axis_name="data")
def share(x, scale, bias, weights):  # this device's share of `weighted`'s loss
    y, mean, var = normalize(x, scale, bias, 1e-5)
    return jnp.sum(y * weights) + (0.3 * jnp.sum(mean ** 2) + 1.7 * jnp.sum(var)) / 2
def local(x, scale, bias, weights):  # each device: its rows, and its share of the gradients
    out = normalize(x, scale, bias, 1e-5)
    grads = jax.grad(share, (0, 1, 2))(x, scale, bias, weights)
    return out, (grads[0], grads[1][None], grads[2][None])
spread = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                               out_specs=((P("data"), P(), P()), P("data")), check_vma=False))
(y, mean, var), (grad_x, grad_scale, grad_bias) = spread(x, scale, bias, weights)
want = batch_normalize(x, scale, bias, 1e-5)
want_grads = jax.grad(weighted(batch_normalize, weights), (0, 1, 2))(x, scale, bias)
got = [y, mean, var, grad_x, grad_scale.sum(0), grad_bias.sum(0)]
errors = [float(jnp.abs(a - b).max()) for a, b in zip(got, [*want, *want_grads])]
dropout = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False)
def dropped(x, key):
    return dropout.apply({}, x, rngs={"dropout": key})
def dropped_here(x, key):
    return whole_batch_dropout(lambda a: dropped(a, key), x, 0.5, "data")
key = jax.random.key(3)
here = jax.jit(jax.shard_map(dropped_here, mesh=mesh, in_specs=(P("data"), P()),
                             out_specs=P("data"), check_vma=False))(x, key)
print(json.dumps({"errors": errors, "dropout_equal": bool((here == dropped(x, key)).all()),
                  "dropped": float((here == 0).mean())}))
"""


@pytest.mark.slow
def test_spread_over_devices_it_normalises_and_drops_as_the_whole_batch():
    """On 2 devices inside `jax.shard_map`, each with half the rows: the values and the input
    gradients of the whole batch, the scale and bias gradients as shares that sum to the whole
    batch's, and the whole batch's dropout masks."""
    result = subprocess.run([sys.executable, "-c", SPREAD_SCRIPT], cwd=ROOT,
                            env=child_env(2), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(found["errors"]) < 1e-4, found["errors"]
    assert found["dropout_equal"] and 0.2 < found["dropped"] < 0.8
