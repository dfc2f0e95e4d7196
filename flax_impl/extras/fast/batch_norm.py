"""Batch normalisation with one cross-batch reduction each way, for a batch split over devices.

`flax_impl.model.batch_normalize` computes the mean, then the variance around it, and lets
autodiff derive the backward pass: with the batch split over devices, XLA turns each of those
sums over the batch into its own all-reduce, two in the forward pass and two in the backward
pass of every layer, each a round trip between the processes (gloo on CPU). This drop-in sums
the batch once each way:

- forward: the first two moments in one reduction, E[x] and E[x^2] side by side; the variance
  is E[x^2] - E[x]^2;
- backward: the textbook gradient, dx = scale / sigma * (dy - mean(dy) - x_hat mean(dy x_hat)),
  with sum(dy) and sum(dy x_hat) (also the bias and scale gradients) in one reduction.

Values and gradients equal `flax_impl.model.batch_normalize`'s to float rounding
(tests/test_fast_batch_norm.py). Chosen by `flax_impl.extras.kernels` when the batch is split
over several devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance over all axes but the last, from one reduction."""
    axes = tuple(range(1, x.ndim))  # the stacked array's batch axes
    mean, mean_square = jnp.stack([x, jnp.square(x)]).mean(axes)
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


@jax.custom_vjp
def _normalize(x, scale, bias, epsilon):
    return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
    mean, var = _moments(x)
    inv_std = jax.lax.rsqrt(var + epsilon)
    out = (x - mean) * (inv_std * scale) + bias, mean, var
    return out, (x, scale, mean, inv_std, epsilon)


def _normalize_bwd(residuals, cotangents):
    x, scale, mean, inv_std, epsilon = residuals
    grad_y, grad_mean, grad_var = cotangents
    centred = x - mean
    x_hat = centred * inv_std
    count = x.size // x.shape[-1]
    axes = tuple(range(1, x.ndim))  # the stacked array's batch axes
    sum_grad, sum_grad_x_hat = jnp.stack([grad_y, grad_y * x_hat]).sum(axes)
    grad_x = (scale * inv_std) * (grad_y - (sum_grad + x_hat * sum_grad_x_hat) / count)
    # The mean and variance are outputs too (the running averages use them).
    grad_x = grad_x + (grad_mean + 2 * grad_var * centred) / count
    return grad_x, sum_grad_x_hat, sum_grad, jnp.zeros_like(epsilon)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`flax_impl.model.batch_normalize` with one reduction over the batch each way:
    (normalised x, batch mean, biased batch variance)."""
    return _normalize(x, scale, bias, jnp.asarray(epsilon, x.dtype))
