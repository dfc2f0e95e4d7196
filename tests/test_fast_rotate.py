"""flax_impl.extras.fast.rotate: the shifted copies equal the gather up to their bound, NaN beyond it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import augment
from flax_impl.extras.fast import rotate as fast_rotate
from flax_impl.extras.fast.rotate import MAX_SHIFT_RADIUS, rotate_by_shifts, shift_radius
from tests.test_augment import digits


@pytest.mark.parametrize("max_degrees", [1.0, 7.0, 15.0, 22.0])
def test_shifted_copies_equal_the_gather_up_to_the_bound(max_degrees):
    images = digits()
    angles = np.random.default_rng(1).uniform(-max_degrees, max_degrees, 16).astype(np.float32)
    angles[:2] = max_degrees, -max_degrees  # the extremes move pixels furthest
    shifts = rotate_by_shifts(images, jnp.asarray(angles), shift_radius(28, 28, max_degrees))
    # The same bilinear weights, applied as shifted copies instead of a gather: each pixel a sum
    # of a few products of numbers in [0, 1], in another order: a few 1e-7 apart.
    np.testing.assert_allclose(shifts, augment.rotate(images, jnp.asarray(angles)), atol=1e-5)


def test_the_radius_covers_the_largest_displacement():
    # At 7 degrees a corner pixel of a 28x28 image moves 1.75 pixels along an axis.
    assert shift_radius(28, 28, 7.0) == 2
    assert shift_radius(28, 28, -7.0) == 2
    assert shift_radius(28, 28, 0.0) == 1
    assert shift_radius(28, 28, 180.0) == shift_radius(28, 28, 135.0) > MAX_SHIFT_RADIUS


@pytest.mark.parametrize("max_degrees", [None, 90.0])
def test_no_bound_or_a_large_one_is_the_gather(max_degrees):
    images = digits(2)
    angles = jnp.array([90.0, -60.0])
    np.testing.assert_array_equal(fast_rotate(images, angles, max_degrees),
                                  augment.rotate(images, angles))


def test_an_angle_beyond_the_bound_gives_nan_not_a_wrong_image():
    images = digits(3)
    rotated = fast_rotate(images, jnp.array([7.0, -7.0, 12.0]), max_degrees=7.0)
    assert np.isfinite(rotated[:2]).all()
    assert np.isnan(rotated[2]).all()
