"""Random rotation in JAX, on device, inside the jitted train step.

Mirrors `torch_ref/augment.py` (torch's `affine_grid` + bilinear `grid_sample`, zeros padding,
`align_corners=False`): the same angle gives the same image.

Bilinear interpolation reads each output pixel's source point from the four input pixels around
it. For any angle, `rotate` gathers them (`map_coordinates`). For the small angles of the
augmentation no pixel moves far, and `rotate` with a `max_degrees` bound instead sums shifted
copies of the image, each weighted by the bilinear "tent" weight of its shift: no gather, which
XLA:CPU runs slowly, and cheap to fuse into what follows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

# Above this many pixels of displacement the shifted copies, (2 * radius + 1)**2 of them, cost
# more than the gather.
MAX_SHIFT_RADIUS = 3


def _pixel_grid(height: int, width: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(rows, cols), each (H, W): every pixel's row and column index."""
    return jnp.meshgrid(jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype),
                        indexing="ij")


def _source_offsets(height: int, width: int, degrees: jax.Array, dtype):
    """(dy, dx) of shape (B, H, W): where each output pixel reads, relative to itself."""
    radians = jnp.deg2rad(degrees)[:, None, None]
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    rows, cols = _pixel_grid(height, width, dtype)
    # Coordinates about the centre; each output pixel reads the input at its position rotated
    # the other way.
    x, y = cols - (width - 1) / 2, rows - (height - 1) / 2
    return sin * x + cos * y - y, cos * x - sin * y - x


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


def _rotate_by_shifts(images: jax.Array, degrees: jax.Array, radius: int) -> jax.Array:
    """Bilinear rotation as a sum of the image shifted by up to `radius` pixels each way."""
    _, height, width, _ = images.shape
    dy, dx = (offset[..., None] for offset in _source_offsets(height, width, degrees,
                                                                images.dtype))
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


def _rotate_by_gather(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Bilinear rotation by any angle: each source point's four neighbours, gathered."""
    _, height, width, _ = images.shape
    dy, dx = _source_offsets(height, width, degrees, images.dtype)
    rows, cols = _pixel_grid(height, width, images.dtype)

    def rotate_one(image, source_y, source_x):  # (H, W) image
        return map_coordinates(image, [source_y, source_x], order=1, mode="constant", cval=0.0)

    per_channel = jax.vmap(rotate_one, in_axes=(-1, None, None), out_axes=-1)
    return jax.vmap(per_channel)(images, rows + dy, cols + dx)


def rotate(images: jax.Array, degrees: jax.Array, max_degrees: float | None = None) -> jax.Array:
    """Rotate each image of (B, H, W, C) counter-clockwise by its angle in degrees (bilinear, 0 fill).

    `max_degrees`, if given, must bound every |angle|: small bounds take the gather-free path,
    which cannot reach pixels further away, so an image whose angle breaks the bound comes out
    NaN rather than silently wrong.
    """
    if max_degrees is not None:
        radius = shift_radius(images.shape[1], images.shape[2], max_degrees)
        if radius <= MAX_SHIFT_RADIUS:
            rotated = _rotate_by_shifts(images, degrees, radius)
            within = (jnp.abs(degrees) <= abs(max_degrees))[:, None, None, None]
            return jnp.where(within, rotated, jnp.nan)
    return _rotate_by_gather(images, degrees)


def random_rotate(images: jax.Array, max_degrees: float, key: jax.Array) -> jax.Array:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    if max_degrees == 0:
        return images
    degrees = jax.random.uniform(key, (images.shape[0],), images.dtype, -max_degrees, max_degrees)
    return rotate(images, degrees, max_degrees)
