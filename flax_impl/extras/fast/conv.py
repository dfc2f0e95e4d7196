"""A drop-in `lax.conv_general_dilated` whose gradients are plain matrix products (CPU kernel).

XLA:CPU lowers the weight gradient of a small convolution to a slow generic loop, slower still
inside a `lax.scan` body (jax-ml/jax#12868). For the
convolutions our models use (NHWC/HWIO, stride 1, no dilation, no groups) this module computes:

- forward: the ordinary XLA convolution; for at most `im2col_channels` (3) input channels (the
  first layer) one product of the im2col matrix (the 9 shifted inputs side by side) with the
  kernel, the matrix kept for the backward pass;
- input gradient: a full convolution of the output gradient with the flipped kernel (XLA's fast
  forward path);
- kernel gradient: for each of the 9 taps, shifted input^T @ output gradient, a matrix product
  (im2col without materialising the patches), in a loop over the taps; for the first layer one
  product with the im2col matrix.

A depthwise convolution (`feature_group_count` = the input's channels, one filter each: XLA:CPU's
grouped convolution is slower than a full one, docs/recipes.md) is the sum of the shifted inputs
times their taps' weights, its gradients by autodiff (`depthwise_valid`).

Values and gradients equal `lax.conv_general_dilated`'s to float tolerance (tests/test_fast_conv.py).
Any other convolution falls back to `lax.conv_general_dilated` unchanged. Plug it into Flax with
``nn.Conv(..., conv_general_dilated=conv_general_dilated)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
IM2COL_CHANNELS = 3  # an image's channels: up to this many, the first layer's im2col path applies


def _shifted(x: jax.Array, height: int, width: int) -> list[jax.Array]:
    """The taps' shifted views of NHWC `x` (tap-major), each the size of the 'VALID' output."""
    out_h, out_w = x.shape[1] - height + 1, x.shape[2] - width + 1
    return [x[:, i:i + out_h, j:j + out_w, :] for i in range(height) for j in range(width)]


def _im2col(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B * output pixels, taps * C): each row an output pixel's input window, tap-major."""
    windows = _shifted(x, height, width)
    return jnp.concatenate(windows, axis=-1).reshape(-1, height * width * x.shape[-1])


def _output_shape(x: jax.Array, kernel: jax.Array) -> tuple[int, int, int, int]:
    height, width, _, out_features = kernel.shape
    return x.shape[0], x.shape[1] - height + 1, x.shape[2] - width + 1, out_features


def _forward(x: jax.Array, kernel: jax.Array, im2col_channels: int):
    """The convolution, and the im2col matrix when it was built (few input channels) or None."""
    height, width, in_features, out_features = kernel.shape
    if in_features <= im2col_channels:
        # Few input channels (the first layer): XLA's convolution is slow here, and whatever
        # computes `x` (the augmentation) would be fused into it and recomputed per tap and
        # output channel. One product over the materialised im2col matrix is fast, and the
        # kernel gradient reuses the matrix.
        patches = _im2col(x, height, width)
        out = patches @ kernel.reshape(-1, out_features)
        return out.reshape(_output_shape(x, kernel)), patches
    out = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
    return out, None


def _kernel_grad_per_tap(x: jax.Array, flat_grad: jax.Array, height: int, width: int):
    """(taps, C_in, C_out): one (C_in, N) @ (N, C_out) product per tap, in a loop over the taps.

    Not one product over the im2col matrix: XLA:CPU's concatenation of columns C_in wide costs
    more than it saves. A loop, not nine unrolled slices: XLA fuses whatever computed `x`
    (BatchNorm, ReLU, dropout) into each slice and recomputes it nine times; a loop's operand is
    materialised once, and each window is a plain copy.
    """
    batch, in_height, in_width, in_features = x.shape
    window_shape = (batch, in_height - height + 1, in_width - width + 1, in_features)

    def add_tap(tap, grad_kernel):
        window = lax.dynamic_slice(x, (0, tap // width, tap % width, 0), window_shape)
        return grad_kernel.at[tap].set(window.reshape(-1, in_features).T @ flat_grad)

    shape = (height * width, in_features, flat_grad.shape[-1])
    return lax.fori_loop(0, height * width, add_tap, jnp.zeros(shape, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_valid(x: jax.Array, kernel: jax.Array, im2col_channels: int = IM2COL_CHANNELS
               ) -> jax.Array:
    """Stride-1 'VALID' convolution of NHWC `x` with an HWIO `kernel`."""
    return _forward(x, kernel, im2col_channels)[0]


def _conv_valid_fwd(x, kernel, im2col_channels):
    out, patches = _forward(x, kernel, im2col_channels)
    return out, (x, kernel, patches)


def _conv_valid_bwd(im2col_channels, residuals, grad_out):
    x, kernel, patches = residuals
    height, width, in_features, out_features = kernel.shape
    flat_grad = grad_out.reshape(-1, out_features)
    if patches is not None:
        # One (taps * C_in, N) @ (N, C_out) product, N = batch * output pixels, rather than
        # nine thin products with C_in = 1.
        grad_kernel = patches.T @ flat_grad
    else:
        grad_kernel = _kernel_grad_per_tap(x, flat_grad, height, width)
    # Input gradient: full convolution of the output gradient with the flipped kernel.
    padded = jnp.pad(grad_out, ((0, 0), (height - 1, height - 1), (width - 1, width - 1), (0, 0)))
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_x = lax.conv_general_dilated(padded, flipped, (1, 1), "VALID", dimension_numbers=NHWC)
    return grad_x, grad_kernel.reshape(kernel.shape)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def depthwise_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 'VALID' depthwise convolution of NHWC `x` with an (H, W, 1, C) `kernel`: the sum
    of the shifted inputs, each times its tap's per-channel weights (gradients by autodiff)."""
    height, width = kernel.shape[:2]
    taps = kernel[:, :, 0].reshape(height * width, -1)
    return sum(window * tap for window, tap in zip(_shifted(x, height, width), taps, strict=True))


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
                         precision=None, preferred_element_type=None, *,
                         im2col_channels: int = IM2COL_CHANNELS, **options):
    """`lax.conv_general_dilated` with a fast backward pass for stride-1 NHWC convolutions,
    and shifted multiply-adds for depthwise ones.

    Inputs with at most `im2col_channels` channels take the im2col path (0 turns it off).
    Other keywords of `lax.conv_general_dilated` (`nnx.Conv` passes `out_sharding`) are passed
    on; given a value, they take the plain convolution.
    """
    options = {name: value for name, value in options.items() if value is not None}
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    explicit = _explicit_padding(padding, rhs.shape[:2]) if lhs.ndim == 4 else None
    fast = (expected == nhwc and explicit is not None
            and all(s == 1 for s in window_strides)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and batch_group_count == 1 and preferred_element_type is None and not options)
    depthwise = feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
    fast = fast and (feature_group_count == 1 or depthwise)
    if not fast:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        batch_group_count, precision, preferred_element_type,
                                        **options)
    if any(p for pair in explicit for p in pair):
        lhs = jnp.pad(lhs, ((0, 0), *explicit, (0, 0)))
    if feature_group_count > 1:
        return depthwise_valid(lhs, rhs)
    return conv_valid(lhs, rhs, im2col_channels)
