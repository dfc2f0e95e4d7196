"""flax_impl.extras.fast.conv: the fast-backward convolution equals lax.conv_general_dilated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flax_impl.extras.fast.conv import conv_general_dilated
from tests.conftest import normal

DN = ("NHWC", "HWIO", "NHWC")


def loss_pair(padding, strides=(1, 1), **options):
    def reference(x, w):
        return jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, strides, padding,
                                                         dimension_numbers=DN)))

    def fast(x, w):
        numbers = lax.conv_dimension_numbers(x.shape, w.shape, DN)
        return jnp.sum(jnp.sin(conv_general_dilated(x, w, strides, padding,
                                                    dimension_numbers=numbers, **options)))

    return reference, fast


@pytest.mark.parametrize("size, cin, cout, padding", [
    (28, 1, 10, "VALID"), (12, 16, 16, "VALID"), (9, 3, 5, "SAME"), (7, 8, 4, ((1, 1), (1, 1))),
    (8, 4, 6, ((2, 0), (0, 1))),
])
@pytest.mark.parametrize("im2col_channels", [3, 0])  # with and without the first-layer path
def test_value_and_gradients_equal_lax(size, cin, cout, padding, im2col_channels):
    x, w = normal(0, (3, size, size, cin)), normal(1, (3, 3, cin, cout))
    reference, fast = loss_pair(padding, im2col_channels=im2col_channels)
    (value, grads), (want_value, want_grads) = (
        jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (fast, reference))
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_jitted_and_inside_scan_it_still_matches():
    x, w = normal(0, (4, 3, 10, 10, 6)), normal(1, (3, 3, 6, 5))
    reference, fast = loss_pair("VALID")

    def summed(loss):
        return jax.jit(jax.grad(lambda w: lax.scan(lambda c, xi: (c + loss(xi, w), None),
                                                   0.0, x)[0]))

    np.testing.assert_allclose(summed(fast)(w), summed(reference)(w), rtol=1e-4, atol=1e-4)


def test_unsupported_convolutions_fall_back_to_lax():
    x, w = normal(0, (2, 9, 9, 3)), normal(1, (3, 3, 3, 4))
    reference, fast = loss_pair("VALID", strides=(2, 2))
    # Un-jitted: the fallback also runs operation by operation.
    np.testing.assert_allclose(jax.grad(fast, 1)(x, w), jax.grad(reference, 1)(x, w), rtol=1e-5)
