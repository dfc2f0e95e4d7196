"""A drop-in `flax_impl.augment.rotate` without a gather, for small angles (CPU kernel).

XLA:CPU runs the gather of `map_coordinates` slowly. For the augmentation's small angles no
pixel moves far, and the bilinear rotation is a sum of shifted copies of the image, each weighted
by the bilinear "tent" weight of its shift: no gather, and cheap to fuse into what follows.
Equal to the gather to float rounding (tests/test_fast_rotate.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flax_impl import augment

# Above this many pixels of displacement the shifted copies, (2 * radius + 1)**2 of them, cost
# more than the gather.
MAX_SHIFT_RADIUS = 3


def shift_radius(height: int, width: int, max_degrees: float) -> int:
    """The largest whole-pixel shift a bilinear rotation by up to `max_degrees` reads from.

    A pixel at (x, y) from the centre moves by ((cos - 1) x - sin y, sin x + (cos - 1) y), at
    most (1 - cos + |sin|) times the half-size along each axis; that bound grows with the angle
    up to 135 degrees.
    """
    radians = math.radians(min(abs(max_degrees), 135.0))
    half = max(height - 1, width - 1) / 2
    return math.floor(half * (1 - math.cos(radians) + math.sin(radians))) + 1


def _tent(distance: jax.Array) -> jax.Array:
    """The bilinear weight of a pixel `distance` away along one axis."""
    return jnp.maximum(0.0, 1.0 - jnp.abs(distance))


def rotate_by_shifts(images: jax.Array, degrees: jax.Array, radius: int) -> jax.Array:
    """Bilinear rotation as a sum of the image shifted by up to `radius` pixels each way."""
    _, height, width, _ = images.shape
    dy, dx = (offset[..., None]
              for offset in augment.source_offsets(height, width, degrees, images.dtype))
    padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    rotated = jnp.zeros_like(images)
    for shift_y in range(-radius, radius + 1):
        row = jnp.zeros_like(images)
        for shift_x in range(-radius, radius + 1):
            shifted = padded[:, radius + shift_y:radius + shift_y + height,
                             radius + shift_x:radius + shift_x + width, :]
            row += _tent(dx - shift_x) * shifted
        rotated += _tent(dy - shift_y) * row
    return rotated


def rotate(images: jax.Array, degrees: jax.Array, max_degrees: float | None = None,
           max_shift_radius: int = MAX_SHIFT_RADIUS) -> jax.Array:
    """`augment.rotate`, by shifted copies when `max_degrees` bounds the angles tightly enough.

    The shifted copies cannot reach pixels further away than the bound allows, so an image whose
    angle breaks the bound comes out NaN rather than silently wrong. Without a bound, or for a
    large one, this is `augment.rotate` (the gather).
    """
    if max_degrees is not None:
        radius = shift_radius(images.shape[1], images.shape[2], max_degrees)
        if radius <= max_shift_radius:
            rotated = rotate_by_shifts(images, degrees, radius)
            within = (jnp.abs(degrees) <= abs(max_degrees))[:, None, None, None]
            return jnp.where(within, rotated, jnp.nan)
    return augment.rotate(images, degrees)
