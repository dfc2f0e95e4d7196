"""Random rotation in JAX, on device, inside the jitted train step.

Mirrors `torch_ref/augment.py` (torch's `affine_grid` + bilinear `grid_sample`, zeros padding,
`align_corners=False`): the same angle gives the same image. Each output pixel reads the input
at its position rotated the other way, bilinearly (`map_coordinates`).
`flax_impl.extras.fast.rotate` is a drop-in for CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


def pixel_grid(height: int, width: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(rows, cols), each (H, W): every pixel's row and column index."""
    return jnp.meshgrid(jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype),
                        indexing="ij")


def source_offsets(height: int, width: int, degrees: jax.Array, dtype):
    """(dy, dx) of shape (B, H, W): where each output pixel reads, relative to itself."""
    radians = jnp.deg2rad(degrees)[:, None, None]
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    rows, cols = pixel_grid(height, width, dtype)
    x, y = cols - (width - 1) / 2, rows - (height - 1) / 2  # about the centre
    return sin * x + cos * y - y, cos * x - sin * y - x


def rotate(images: jax.Array, degrees: jax.Array, max_degrees: float | None = None) -> jax.Array:
    """Rotate each image of (B, H, W, C) counter-clockwise by its angle in degrees (bilinear, 0
    fill). `max_degrees` (a bound on every |angle|) is for drop-ins that can use it."""
    _, height, width, _ = images.shape
    dy, dx = source_offsets(height, width, degrees, images.dtype)
    rows, cols = pixel_grid(height, width, images.dtype)

    def rotate_one(image, source_y, source_x):  # (H, W) image
        return map_coordinates(image, [source_y, source_x], order=1, mode="constant", cval=0.0)

    per_channel = jax.vmap(rotate_one, in_axes=(-1, None, None), out_axes=-1)
    return jax.vmap(per_channel)(images, rows + dy, cols + dx)


def random_rotate(images: jax.Array, max_degrees: float, key: jax.Array,
                  rotate_fn: Callable = rotate) -> jax.Array:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] with
    `rotate_fn` (`rotate` or a drop-in)."""
    if max_degrees == 0:
        return images
    degrees = jax.random.uniform(key, (images.shape[0],), images.dtype, -max_degrees, max_degrees)
    return rotate_fn(images, degrees, max_degrees)
