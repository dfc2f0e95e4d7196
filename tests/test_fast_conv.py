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


def loss_pair(padding, strides=(1, 1), groups=1, **options):
    def reference(x, w):
        return jnp.sum(jnp.sin(lax.conv_general_dilated(x, w, strides, padding,
                                                         dimension_numbers=DN,
                                                         feature_group_count=groups)))

    def fast(x, w):
        numbers = lax.conv_dimension_numbers(x.shape, w.shape, DN)
        return jnp.sum(jnp.sin(conv_general_dilated(x, w, strides, padding,
                                                    dimension_numbers=numbers,
                                                    feature_group_count=groups, **options)))

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
    # Products summed in other orders: the value (a sum of sines of sums of up to 144 products)
    # within 1e-6 relative, each gradient entry a sum of up to 3 x 28 x 28 products of normal
    # numbers, of size ~50, within a few 1e-5 absolute: float32 rounding on any CPU.
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_jitted_and_inside_scan_it_still_matches():
    x, w = normal(0, (4, 3, 10, 10, 6)), normal(1, (3, 3, 6, 5))
    reference, fast = loss_pair("VALID")

    def summed(loss):
        return jax.jit(jax.grad(lambda w: lax.scan(lambda c, xi: (c + loss(xi, w), None),
                                                   0.0, x)[0]))

    # (the kernel gradient's sums, as above, over four steps of the scan)
    np.testing.assert_allclose(summed(fast)(w), summed(reference)(w), rtol=1e-4, atol=1e-4)


def test_unsupported_convolutions_fall_back_to_lax():
    x, w = normal(0, (2, 9, 9, 3)), normal(1, (3, 3, 3, 4))
    reference, fast = loss_pair("VALID", strides=(2, 2))
    # Un-jitted: the fallback also runs operation by operation.
    # (the same lax call on both sides: only XLA's fusion of the sines may differ)
    np.testing.assert_allclose(jax.grad(fast, 1)(x, w), jax.grad(reference, 1)(x, w), rtol=1e-5)


@pytest.mark.parametrize("size, channels, padding", [(24, 16, "VALID"), (10, 6, "SAME"),
                                                     (7, 3, ((1, 0), (0, 1)))])
def test_depthwise_value_and_gradients_equal_lax(size, channels, padding):
    x, w = normal(0, (3, size, size, channels)), normal(1, (3, 3, 1, channels))
    reference, fast = loss_pair(padding, groups=channels)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fast)(x, w))  # shifted products
    (value, grads), (want_value, want_grads) = (
        jax.jit(jax.value_and_grad(f, (0, 1)))(x, w) for f in (fast, reference))
    # Nine products a pixel, summed in another order; the kernel's gradient sums 3 x size^2
    # of them: float32 rounding, relative 1e-6 at most, bounded here with room.
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
