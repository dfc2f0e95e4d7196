"""flax_impl.augment: both rotation paths agree with each other, with geometry and with torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_impl import augment
from flax_impl.augment import random_rotate, rotate, shift_radius
from torch_ref.augment import rotate as torch_rotate


def digits(count=16, seed=0):
    """Random blobs with a zero border, like MNIST digits."""
    images = np.random.default_rng(seed).random((count, 28, 28, 1), np.float32)
    images[:, :4], images[:, -4:], images[:, :, :4], images[:, :, -4:] = 0, 0, 0, 0
    return jnp.asarray(images)


@pytest.mark.parametrize("max_degrees", [1.0, 7.0, 15.0, 22.0])
def test_shifted_copies_equal_the_gather_up_to_the_bound(max_degrees):
    images = digits()
    angles = np.random.default_rng(1).uniform(-max_degrees, max_degrees, 16).astype(np.float32)
    angles[:2] = max_degrees, -max_degrees  # the extremes move pixels furthest
    shifts = augment._rotate_by_shifts(images, jnp.asarray(angles),
                                       shift_radius(28, 28, max_degrees))
    gather = augment._rotate_by_gather(images, jnp.asarray(angles))
    np.testing.assert_allclose(shifts, gather, atol=1e-5)


def test_the_radius_covers_the_largest_displacement():
    # At 7 degrees a corner pixel of a 28x28 image moves 1.75 pixels along an axis.
    assert shift_radius(28, 28, 7.0) == 2
    assert shift_radius(28, 28, -7.0) == 2
    assert shift_radius(28, 28, 0.0) == 1
    assert shift_radius(28, 28, 180.0) == shift_radius(28, 28, 135.0) > augment.MAX_SHIFT_RADIUS


def test_large_bounds_take_the_gather_path(monkeypatch):
    def no_shifts(*args):
        raise AssertionError("the shifted-copies path was taken for a large angle bound")

    monkeypatch.setattr(augment, "_rotate_by_shifts", no_shifts)
    images = digits(2)
    rotated = rotate(images, jnp.array([90.0, 90.0]), max_degrees=90.0)
    np.testing.assert_allclose(rotated[0, ..., 0], np.rot90(np.asarray(images[0, ..., 0])),
                               atol=1e-5)


@pytest.mark.parametrize("max_degrees", [None, 7.0])
def test_both_paths_rotate_as_torch_does(max_degrees):
    images = digits(8, seed=3)
    angles = np.linspace(-7, 7, 8).astype(np.float32)
    by_torch = torch_rotate(torch.tensor(np.asarray(images)).permute(0, 3, 1, 2),
                            torch.tensor(angles)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(rotate(images, jnp.asarray(angles), max_degrees), by_torch,
                               atol=1e-5)


def test_an_angle_beyond_the_bound_gives_nan_not_a_wrong_image():
    images = digits(3)
    rotated = rotate(images, jnp.array([7.0, -7.0, 12.0]), max_degrees=7.0)
    assert np.isfinite(rotated[:2]).all()
    assert np.isnan(rotated[2]).all()


def test_random_rotate_draws_its_angles_from_the_key_and_zero_is_identity():
    images = digits(64)
    key = jax.random.key(0)
    rotated = random_rotate(images, 7.0, key)
    assert not np.allclose(rotated, images)
    # The same key draws the same angles: rotating by them directly gives the same images.
    angles = jax.random.uniform(key, (64,), images.dtype, -7.0, 7.0)
    np.testing.assert_allclose(rotated, rotate(images, angles), atol=1e-5)
    assert random_rotate(images, 0.0, key) is images
