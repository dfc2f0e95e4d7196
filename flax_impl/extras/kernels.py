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
from flax_impl.model import batch_normalize

KERNELS = ("auto", "stock", "fast")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementations of the operations that have a CPU kernel, and `batch_axis`: the
    mesh axis each device's share of the batch is trained over inside `jax.shard_map` (None:
    the jitted step is split by XLA; `flax_impl.core.make_train_step`)."""

    conv: Any = nn.Conv  # a ModuleDef: called like nn.Conv
    max_pool: Callable = nn.max_pool
    rotate: Callable = augment.rotate
    conv_general_dilated: Callable = jax.lax.conv_general_dilated  # what `nnx.Conv` takes
    batch_normalize: Callable = batch_normalize  # what both models' BatchNorm trains with
    batch_axis: str | None = None


STOCK = Kernels()


@functools.cache
def fast_kernels(batch_axis: str | None = None) -> Kernels:
    """The CPU kernels of `flax_impl.extras.fast`; with `batch_axis`, for a batch spread over
    that mesh axis's devices: each device trains on its share inside `jax.shard_map`, BatchNorm
    sums the whole batch once each way (`fast.batch_normalize`), and the gradients cross the
    devices in one flat buffer (gloo reduces each array of an all-reduce on its own)."""
    conv = fast.conv_general_dilated
    normalize = (batch_normalize if batch_axis is None
                 else functools.partial(fast.batch_normalize, axis_name=batch_axis))
    return Kernels(conv=functools.partial(nn.Conv, conv_general_dilated=conv),
                   max_pool=fast.max_pool, rotate=fast.rotate, conv_general_dilated=conv,
                   batch_normalize=normalize, batch_axis=batch_axis)


FAST = fast_kernels(None)  # as `get_kernels` asks for it: the same cached Kernels


def resolve(kernels: str, backend: str | None = None) -> str:
    """"stock" or "fast": what `kernels` ("auto", "stock" or "fast") means on `backend`."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")
    if kernels == "auto":
        return "fast" if (backend or jax.default_backend()) == "cpu" else "stock"
    return kernels


def get_kernels(kernels: str | Kernels = "auto", batch_axis: str | None = None) -> Kernels:
    """The Kernels a name stands for (on this backend), for a batch spread over the mesh axis
    `batch_axis` (None: one device); a Kernels is returned as it is."""
    if isinstance(kernels, Kernels):
        return kernels
    return fast_kernels(batch_axis) if resolve(kernels) == "fast" else STOCK
