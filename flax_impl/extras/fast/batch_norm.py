"""Batch normalisation with one cross-batch reduction each way, for a batch split over devices.

`flax_impl.model.batch_normalize` computes the mean, then the variance around it, and lets
autodiff derive the backward pass: with the batch split over devices, each of those sums over
the batch crosses the devices on its own, two all-reduces in the forward pass and two in the
backward pass of every layer, each a round trip between the processes (gloo on CPU). This
drop-in sums the batch once each way, over the devices of `axis_name` (inside `jax.shard_map`,
where each device holds its share of the batch):

- forward: the first two moments in one reduction, E[x] and E[x^2] side by side; the variance
  is E[x^2] - E[x]^2;
- backward: the textbook gradient, dx = scale / sigma * (dy - mean(dy) - x_hat mean(dy x_hat)),
  with sum(dy) and sum(dy x_hat) (also the bias and scale gradients) in one reduction.

Values and gradients equal `flax_impl.model.batch_normalize`'s to float rounding
(tests/test_fast_batch_norm.py). Chosen by `flax_impl.extras.kernels` when the batch is split
over several devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _batch_sum(stacked: jax.Array) -> jax.Array:
    """The sum over the batch axes of `stacked` (arrays stacked: all axes but the first and the
    channels)."""
    return stacked.sum(tuple(range(1, stacked.ndim - 1)))


def _over_devices(total: jax.Array, axis_name: str | None) -> jax.Array:
    """`total` summed over the devices of `axis_name` (one all-reduce), or as it is."""
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def count_of(x: jax.Array, axis_name: str | None = None):
    """The values per channel of the whole batch: this device's, times the devices."""
    count = x.size // x.shape[-1]
    return count if axis_name is None else count * jax.lax.psum(1, axis_name)


def _moments(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all axes but the last, from one reduction."""
    mean, mean_square = _over_devices(_batch_sum(jnp.stack([x, jnp.square(x)])),
                                      axis_name) / count_of(x, axis_name)
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _normalize(x, scale, bias, epsilon, axis_name):
    return _normalize_fwd(x, scale, bias, epsilon, axis_name)[0]


def _normalize_fwd(x, scale, bias, epsilon, axis_name):
    mean, var = _moments(x, axis_name)
    inv_std = jax.lax.rsqrt(var + epsilon)
    out = (x - mean) * (inv_std * scale) + bias, mean, var
    return out, (x, scale, mean, inv_std, epsilon)


def _normalize_bwd(axis_name, residuals, cotangents):
    x, scale, mean, inv_std, epsilon = residuals
    grad_y, grad_mean, grad_var = cotangents
    centred = x - mean
    x_hat = centred * inv_std
    count = count_of(x, axis_name)
    # This device's sums; with the batch spread over devices, the mean and variance (outputs
    # too: the running averages use them) are every device's, and so are their cotangents.
    local = _batch_sum(jnp.stack([grad_y, grad_y * x_hat]))
    sum_grad, sum_grad_x_hat, grad_mean, grad_var = _over_devices(
        jnp.concatenate([local, jnp.stack([grad_mean, grad_var])]), axis_name)
    grad_x = (scale * inv_std) * (grad_y - (sum_grad + x_hat * sum_grad_x_hat) / count)
    grad_x = grad_x + (grad_mean + 2 * grad_var * centred) / count
    # The scale and bias gradients: this device's share (the step sums the devices' gradients).
    return grad_x, local[1], local[0], jnp.zeros_like(epsilon)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                    axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`flax_impl.model.batch_normalize` with one reduction over the batch each way, the
    batch's rows spread over the devices of `axis_name` if given: (normalised x, batch mean,
    unbiased batch variance)."""
    y, mean, var = _normalize(x, scale, bias, jnp.asarray(epsilon, x.dtype), axis_name)
    count = count_of(x, axis_name)
    return y, mean, var * count / (count - 1)
