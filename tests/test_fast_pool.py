"""flax_impl.extras.fast.pool: the fast max-pool equals nn.max_pool exactly, ties included."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flax_impl.extras.fast.pool import max_pool
from tests.conftest import normal


@functools.partial(jax.jit, static_argnums=0)  # one program, not one per operation
def value_and_grad(pool, x, cotangent):
    pooled, vjp = jax.vjp(pool, x)
    return pooled, vjp(cotangent)[0]


def tied_input(shape, seed=0):
    """Small integers and a constant block: many windows hold their max more than once."""
    x = np.random.default_rng(seed).integers(0, 3, shape).astype(np.float32)
    x[:, :4, :4, :] = 1.0
    return x


@pytest.mark.parametrize("shape, window", [
    ((3, 24, 24, 16), (2, 2)), ((2, 12, 9, 5), (2, 3)), ((2, 8, 8, 3), (4, 4)),
])
def test_value_and_gradient_equal_nn_max_pool_with_ties(shape, window):
    x = tied_input(shape)
    out_shape = (shape[0], shape[1] // window[0], shape[2] // window[1], shape[3])
    cotangent = normal(1, out_shape)
    fast = value_and_grad(lambda x: max_pool(x, window, strides=window), x, cotangent)
    stock = value_and_grad(lambda x: nn.max_pool(x, window, strides=window), x, cotangent)
    for got, want in zip(fast, stock, strict=True):
        np.testing.assert_array_equal(got, want)
    # Each window passes its gradient to exactly one element, as torch does.
    assert int((fast[1] != 0).sum()) == int((cotangent != 0).sum())


def test_gradient_goes_where_torch_sends_it():
    x = tied_input((2, 6, 6, 4), seed=2)
    cotangent = normal(3, (2, 3, 3, 4))
    _, grad = value_and_grad(lambda x: max_pool(x, (2, 2), strides=(2, 2)), x, cotangent)
    x_torch = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    F.max_pool2d(x_torch, 2).backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(grad, x_torch.grad.permute(0, 2, 3, 1).numpy())


def test_jitted_inside_scan_it_still_matches():
    xs = normal(0, (3, 2, 8, 8, 4))

    def summed(pool):
        def loss(x):
            return jnp.sum(jnp.sin(pool(x, (2, 2), strides=(2, 2))))

        return jax.jit(jax.grad(lambda xs: jax.lax.scan(lambda c, x: (c + loss(x), None),
                                                        0.0, xs)[0]))

    np.testing.assert_array_equal(summed(max_pool)(xs), summed(nn.max_pool)(xs))


@pytest.mark.parametrize("shape, window, strides, padding", [
    ((2, 9, 9, 3), (3, 3), (2, 2), "VALID"),  # overlapping windows
    ((2, 7, 7, 3), (2, 2), (2, 2), "VALID"),  # sizes not divisible: a border is dropped
    ((2, 8, 8, 3), (2, 2), (2, 2), "SAME"),
    ((2, 8, 8, 3), (2, 2), None, "VALID"),  # stride 1
])
def test_other_poolings_fall_back_to_nn_max_pool(shape, window, strides, padding):
    x = normal(0, shape)

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x, window, strides, padding)))

    for transform in (jax.jit, lambda f: jax.jit(jax.grad(f))):
        np.testing.assert_array_equal(transform(loss(max_pool))(x),
                                      transform(loss(nn.max_pool))(x))
