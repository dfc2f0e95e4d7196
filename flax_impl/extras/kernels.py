"""Which convolution, max-pool and rotation the port runs, chosen by construction.

- "stock": `nn.Conv`, `nn.max_pool` and `augment.rotate` (a gather): plain Flax, what runs on
  GPU/TPU;
- "fast": the CPU kernels of `flax_impl.extras.fast`, equal in value and gradient;
- "auto": "fast" on the CPU backend, "stock" elsewhere.

The linen model takes `conv` and `max_pool` as fields (as Flax's ImageNet `ResNet` takes
`conv: ModuleDef`), the NNX model the convolution function `nnx.Conv` calls and the pooling; the
train step takes the rotation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax

from flax_impl import augment
from flax_impl.common.config import KERNEL_CHOICES as KERNELS
from flax_impl.extras import fast


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementations of the operations that have a CPU kernel."""

    name: str = "stock"
    conv_general_dilated: Callable = jax.lax.conv_general_dilated  # what `nnx.Conv` takes
    max_pool: Callable = nn.max_pool
    rotate: Callable = augment.rotate

    @property
    def conv(self):
        """The linen convolution (a ModuleDef: called like `nn.Conv`)."""
        if self.conv_general_dilated is jax.lax.conv_general_dilated:
            return nn.Conv
        return functools.partial(nn.Conv, conv_general_dilated=self.conv_general_dilated)


STOCK = Kernels()
FAST = Kernels("fast", fast.conv_general_dilated, fast.max_pool, fast.rotate)


def get_kernels(kernels: str | Kernels = "auto", backend: str | None = None) -> Kernels:
    """The Kernels a name stands for on `backend` (default: JAX's); a Kernels as it is."""
    if isinstance(kernels, Kernels):
        return kernels
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        kernels = "fast" if (backend or jax.default_backend()) == "cpu" else "stock"
    return FAST if kernels == "fast" else STOCK
