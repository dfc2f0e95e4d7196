"""Which convolution, max-pool and rotation the port runs, chosen by construction.

- "stock": `nn.Conv`, `nn.max_pool` and `augment.rotate` (a gather): plain Flax, what runs on
  GPU/TPU;
- "fast": the CPU kernels of `flax_impl.extras.fast`, equal in value and gradient;
- "auto": "fast" on the CPU backend, "stock" elsewhere.

The linen model takes its convolution and pooling as fields (as Flax's ImageNet `ResNet` takes
`conv: ModuleDef`), the NNX model the convolution function `nnx.Conv` calls and the pooling; the
train step takes the rotation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from flax_impl import augment
from flax_impl.extras import fast

KERNELS = ("auto", "stock", "fast")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementations of the three operations that have a CPU kernel."""

    conv: Any = nn.Conv  # a ModuleDef: called like nn.Conv
    max_pool: Callable = nn.max_pool
    rotate: Callable = augment.rotate
    conv_general_dilated: Callable = jax.lax.conv_general_dilated  # what `nnx.Conv` takes


STOCK = Kernels()
FAST = Kernels(conv=functools.partial(nn.Conv, conv_general_dilated=fast.conv_general_dilated),
               max_pool=fast.max_pool, rotate=fast.rotate,
               conv_general_dilated=fast.conv_general_dilated)


def resolve(kernels: str, backend: str | None = None) -> str:
    """"stock" or "fast": what `kernels` ("auto", "stock" or "fast") means on `backend`."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        return "fast" if (backend or jax.default_backend()) == "cpu" else "stock"
    return kernels


def get_kernels(kernels: str | Kernels = "auto") -> Kernels:
    """The Kernels a name stands for (on this backend); a Kernels is returned as it is."""
    if isinstance(kernels, Kernels):
        return kernels
    return FAST if resolve(kernels) == "fast" else STOCK
