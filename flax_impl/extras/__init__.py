"""The optional layers of the Flax port; the stock port (`model`, `core`) runs without them.

- `kernels` and `fast/`: drop-in CPU kernels for the convolution, max-pool and rotation, equal to
  the stock operations in value and gradient, chosen by `--kernels` (on the CPU by default);
- `distributed`: training over several processes with `jax.distributed`.

`flax_impl.setup` passes them in (by construction: the model takes `conv` and `max_pool`, the
train step takes `rotate`); `flax_impl.train` reaches them only through the setup and its flags.
"""
