"""The optional layers of the Flax port; the stock port (`model`, `nnx_model`, `core`) runs
without them.

- `kernels` and `fast/`: drop-in CPU kernels for the convolution, max-pool and rotation, equal to
  the stock operations in value and gradient, chosen by `--kernels` (on the CPU by default);
- `compile_cache`: JAX's persistent compilation cache for the commands;
- `distributed`: training over several processes with `jax.distributed`.
"""
