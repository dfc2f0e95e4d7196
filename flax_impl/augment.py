"""Random rotation in JAX, on device, inside the jitted train step.

Mirrors `torch_ref/augment.py` (torch's `affine_grid` + bilinear `grid_sample`, zeros padding,
`align_corners=False`): the same angle gives the same image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates


def _rotate_one(image: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate one (H, W) image counter-clockwise by `degrees` about its centre."""
    height, width = image.shape
    radians = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=image.dtype),
                              jnp.arange(width, dtype=image.dtype), indexing="ij")
    cy, cx = (height - 1) / 2, (width - 1) / 2
    x, y = cols - cx, rows - cy
    # Each output pixel reads the input at its position rotated the other way.
    source_x = cos * x - sin * y + cx
    source_y = sin * x + cos * y + cy
    return map_coordinates(image, [source_y, source_x], order=1, mode="constant", cval=0.0)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate each image of (B, H, W, C) counter-clockwise by its angle in degrees (bilinear, 0 fill)."""
    per_channel = jax.vmap(_rotate_one, in_axes=(-1, None), out_axes=-1)
    return jax.vmap(per_channel)(images, degrees)


def random_rotate(images: jax.Array, max_degrees: float, key: jax.Array) -> jax.Array:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    if max_degrees == 0:
        return images
    degrees = jax.random.uniform(key, (images.shape[0],), images.dtype, -max_degrees, max_degrees)
    return rotate(images, degrees)
