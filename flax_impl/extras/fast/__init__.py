"""Optional CPU kernels: drop-ins for what XLA:CPU runs slowly in this network's training step.

- `conv_general_dilated`: for `nn.Conv(conv_general_dilated=...)`, gradients as matrix products;
- `max_pool`: for `nn.max_pool`, a reshape-and-max with an element-wise backward;
- `rotate`: for `flax_impl.augment.rotate`, bilinear rotation by shifted copies (no gather).

Each equals the stock operation to float rounding, values and gradients (tests/test_fast_*.py).
They are chosen by construction (`flax_impl.extras.kernels`), never patched in; on GPU/TPU the stock
operations run.
"""

from flax_impl.extras.fast.conv import conv_general_dilated
from flax_impl.extras.fast.pool import max_pool
from flax_impl.extras.fast.rotate import rotate

__all__ = ["conv_general_dilated", "max_pool", "rotate"]
