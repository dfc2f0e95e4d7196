"""flax_impl.augment: the stock rotation rotates as geometry and torch say; random angles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flax_impl.augment import random_rotate, rotate
from torch_ref.augment import rotate as torch_rotate


def digits(count=16, seed=0):
    """Random blobs with a zero border, like MNIST digits."""
    images = np.random.default_rng(seed).random((count, 28, 28, 1), np.float32)
    images[:, :4], images[:, -4:], images[:, :, :4], images[:, :, -4:] = 0, 0, 0, 0
    return jnp.asarray(images)


def test_a_quarter_turn_is_rot90():
    images = digits(2)
    rotated = rotate(images, jnp.array([90.0, 90.0]))
    # float32's cos(90 degrees) is -4e-8, not 0: each pixel reads 1e-6 of a pixel off, and
    # pixels lie in [0, 1]: at most 1e-6 off.
    np.testing.assert_allclose(rotated[0, ..., 0], np.rot90(np.asarray(images[0, ..., 0])),
                               atol=1e-5)


def test_it_rotates_as_torch_does():
    images = digits(8, seed=3)
    angles = np.linspace(-30, 30, 8).astype(np.float32)
    by_torch = torch_rotate(torch.tensor(np.asarray(images)).permute(0, 3, 1, 2),
                            torch.tensor(angles)).permute(0, 2, 3, 1).numpy()
    # The same formula (no sums), through each framework's sin, cos and bilinear weights: pixels
    # in [0, 1] differ by float32's rounding of the positions, a few 1e-7 (parity check 5).
    np.testing.assert_allclose(rotate(images, jnp.asarray(angles)), by_torch, atol=1e-5)


def test_random_rotate_draws_its_angles_from_the_key_and_zero_is_identity():
    images = digits(64)
    key = jax.random.key(0)
    rotated = random_rotate(images, 7.0, key)
    assert not np.allclose(rotated, images)
    # The same key draws the same angles: rotating by them directly gives the same images.
    angles = jax.random.uniform(key, (64,), images.dtype, -7.0, 7.0)
    np.testing.assert_allclose(rotated, rotate(images, angles), atol=1e-5)  # jitted or not
    assert random_rotate(images, 0.0, key) is images


def test_random_rotate_hands_its_bound_to_the_rotation():
    seen = []

    def recording_rotate(images, degrees, max_degrees=None):
        seen.append(max_degrees)
        return images

    random_rotate(digits(2), 7.0, jax.random.key(0), recording_rotate)
    assert seen == [7.0]
