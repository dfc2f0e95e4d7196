"""Forms of a 3x3 convolution's forward pass on XLA:CPU, at WideNet's shapes (batch 128).

Each column: one jitted forward, median ms. conv: `lax.conv_general_dilated` (what
flax_impl.fast runs past the first layer); im2col: the 9 shifted inputs side by side, one
product; pertap: 9 products summed; rows: the 3 taps of a kernel row side by side, 3 products;
pad8: the input channels padded to a multiple of 8. Usage: python results/fast/conv_forms.py
(its output: results/fast/conv_forms.txt). A benchmark: it prints numbers and asserts nothing.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
SHAPES = [(128, 26, 10, 16), (128, 12, 16, 20), (128, 10, 20, 20), (128, 8, 20, 24),
          (128, 6, 24, 32)]  # batch, input side, input channels, output channels


def bench(f, *args, n=50):
    """Median ms of `n` calls of jitted `f`."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)


def im2col(x, k):
    height, width, channels, out = k.shape
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    windows = [x[:, i:i + oh, j:j + ow, :] for i in range(height) for j in range(width)]
    patches = jnp.concatenate(windows, -1).reshape(-1, height * width * channels)
    return (patches @ k.reshape(-1, out)).reshape(x.shape[0], oh, ow, out)


def pertap(x, k):
    height, width = k.shape[:2]
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    return sum(jnp.einsum("bhwc,co->bhwo", x[:, i:i + oh, j:j + ow, :], k[i, j])
               for i in range(height) for j in range(width))


def rows(x, k):
    height, width, channels, out = k.shape
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    side_by_side = jnp.concatenate([x[:, :, j:j + ow, :] for j in range(width)], -1)
    return sum(jnp.einsum("bhwc,co->bhwo", side_by_side[:, i:i + oh],
                          k[i].reshape(width * channels, out)) for i in range(height))


def pad8(x, k):
    extra = -x.shape[-1] % 8
    return conv(jnp.pad(x, ((0, 0),) * 3 + ((0, extra),)),
                jnp.pad(k, ((0, 0),) * 2 + ((0, extra), (0, 0))))


def main():
    key = jax.random.key(0)
    forms = {"conv": conv, "im2col": im2col, "pertap": pertap, "rows": rows, "pad8": pad8}
    for batch, side, channels, out in SHAPES:
        x = jax.random.normal(key, (batch, side, side, channels))
        k = jax.random.normal(key, (3, 3, channels, out))
        reference = conv(x, k)
        cells = []
        for name, form in forms.items():
            error = float(jnp.abs(jax.jit(form)(x, k) - reference).max())
            cells.append(f"{name} {bench(form, x, k):.2f}ms" + (" WRONG" if error > 1e-3 else ""))
        print((batch, side, channels, out), "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
