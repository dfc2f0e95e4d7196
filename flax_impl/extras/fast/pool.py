"""A drop-in `flax.linen.max_pool` for non-overlapping windows, with a fast backward pass (CPU kernel).

`nn.max_pool` is a `reduce_window`, and its gradient a `select_and_scatter`; XLA:CPU lowers the
pair to a reduce-window that tracks the arg-max's coordinates and a scatter, which is slow
(`python -m compare.speed --ablation` measures it). When the windows
tile the input (window = strides, no padding, sizes divisible) the pool is a reshape and a max,
and its gradient an element-wise select:

- forward: view (B, H, W, C) as (B, H/h, h, W/w, w, C) and take the max over the window axes;
- backward: each window's gradient goes to its *first* maximal element in row-major order, as
  `select_and_scatter` and torch's `max_pool2d` both route it. Ties are common here: a constant
  background gives equal activations, and sending the gradient to every tied element would
  change the training.

Values and gradients equal `nn.max_pool`'s exactly (tests/test_fast_pool.py). Other poolings fall back
to `nn.max_pool` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B, H/h, h, W/w, w, C): each pooling window on axes 2 and 4."""
    batch, height, width, channels = x.shape
    rows, cols = window
    return x.reshape(batch, height // rows, rows, width // cols, cols, channels)


def _tiled_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    return _windows(x, window).max(axis=(2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_2d(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    return _tiled_max_pool(x, window)


def _max_pool_2d_fwd(x, window):
    pooled = _tiled_max_pool(x, window)
    return pooled, (x, pooled)


def _max_pool_2d_bwd(window, residuals, grad_pooled):
    x, pooled = residuals
    rows, cols = window
    windows = _windows(x, window)
    # Position of each element in its window, row-major; the smallest position holding the max
    # is the one that receives the gradient.
    position = jnp.arange(rows * cols).reshape(rows, cols)[None, None, :, None, :, None]
    is_max = windows == pooled[:, :, None, :, None, :]
    first = jnp.where(is_max, position, rows * cols).min(axis=(2, 4), keepdims=True)
    grad = jnp.where(position == first, grad_pooled[:, :, None, :, None, :], 0.0)
    return (grad.astype(x.dtype).reshape(x.shape),)


_max_pool_2d.defvjp(_max_pool_2d_fwd, _max_pool_2d_bwd)


def _no_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "VALID"
    return all(tuple(pair) == (0, 0) for pair in padding)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = "VALID") -> jax.Array:
    """`nn.max_pool(x, window_shape, strides, padding)`, fast for tiling windows on NHWC input."""
    window = tuple(window_shape)
    tiles = (x.ndim == 4 and len(window) == 2
             and tuple(strides or (1,) * len(window)) == window
             and _no_padding(padding)
             and x.shape[1] % window[0] == 0 and x.shape[2] % window[1] == 0)
    if not tiles:
        return nn.max_pool(x, window, strides=strides, padding=padding)
    return _max_pool_2d(x, window)
