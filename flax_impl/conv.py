"""A drop-in `lax.conv_general_dilated` whose gradients are plain matrix products.

XLA:CPU lowers the weight gradient of a small convolution to a slow generic loop, several times
slower than PyTorch's, and slower still inside a `lax.scan` body (jax-ml/jax#12868). For the
convolutions our models use (NHWC/HWIO, stride 1, no dilation, no groups) this module computes:

- forward: the ordinary XLA convolution (a sum of per-tap matrix products for <= 3 input channels);
- input gradient: a full convolution of the output gradient with the flipped kernel (XLA's fast
  forward path);
- kernel gradient: for each of the 9 taps, shifted input^T @ output gradient, a matrix product
  (im2col without materialising the patches); for <= 3 input channels one product over the
  materialised im2col matrix.

Values and gradients equal `lax.conv_general_dilated`'s to float tolerance (tests/test_conv.py).
Any other convolution falls back to `lax.conv_general_dilated` unchanged. Plug it into Flax with
``nn.Conv(..., conv_general_dilated=conv_general_dilated)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
FEW_CHANNELS = 3  # an image's channels: up to this many, the first layer's special cases apply


def _taps(x: jax.Array, height: int, width: int):
    """The (i, j, shifted input) of each kernel tap, the input windows a VALID conv reads."""
    out_h, out_w = x.shape[1] - height + 1, x.shape[2] - width + 1
    for i in range(height):
        for j in range(width):
            yield i, j, x[:, i:i + out_h, j:j + out_w, :]


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    if kernel.shape[2] <= FEW_CHANNELS:
        # Few input channels (the first layer): XLA's convolution is slow here, a sum of
        # per-tap products is not.
        return sum(window @ kernel[i, j] for i, j, window in _taps(x, *kernel.shape[:2]))
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'VALID' convolution of NHWC `x` with an HWIO `kernel`."""
    return _conv(x, kernel)


def _conv_valid_fwd(x, kernel):
    return _conv(x, kernel), (x, kernel)


def _conv_valid_bwd(residuals, grad_out):
    x, kernel = residuals
    height, width, in_features, out_features = kernel.shape
    flat_grad = grad_out.reshape(-1, out_features)
    windows = [window for _, _, window in _taps(x, height, width)]
    if in_features <= FEW_CHANNELS:
        # One (taps * C_in, N) @ (N, C_out) product over the im2col matrix, N = batch * output
        # pixels: nine products with C_in = 1 took five times as long.
        patches = jnp.concatenate(windows, axis=-1).reshape(-1, height * width * in_features)
        grad_kernel = patches.T @ flat_grad
    else:
        # One (C_in, N) @ (N, C_out) product per tap: XLA:CPU's concatenation of im2col
        # columns C_in wide costs more than it saves.
        grad_kernel = jnp.stack([window.reshape(-1, in_features).T @ flat_grad
                                 for window in windows])
    # Input gradient: full convolution of the output gradient with the flipped kernel.
    padded = jnp.pad(grad_out, ((0, 0), (height - 1, height - 1), (width - 1, width - 1), (0, 0)))
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_x = lax.conv_general_dilated(padded, flipped, (1, 1), "VALID", dimension_numbers=NHWC)
    return grad_x, grad_kernel.reshape(kernel.shape)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def _explicit_padding(padding, kernel_shape) -> tuple[tuple[int, int], ...] | None:
    """`padding` as ((top, bottom), (left, right)), or None if it is not one we handle."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            return tuple(((k - 1) // 2, k // 2) for k in kernel_shape)
        return None
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return padding if all(p >= 0 for pair in padding for p in pair) else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` with a fast backward pass for stride-1 NHWC convolutions."""
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    explicit = _explicit_padding(padding, rhs.shape[:2]) if lhs.ndim == 4 else None
    fast = (expected == nhwc and explicit is not None
            and all(s == 1 for s in window_strides)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None)
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        batch_group_count, precision, preferred_element_type)
    if any(p for pair in explicit for p in pair):
        lhs = jnp.pad(lhs, ((0, 0), *explicit, (0, 0)))
    return conv_valid(lhs, rhs)
