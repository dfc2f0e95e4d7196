"""The model table: each network's name, shape and parameter budget, defined once.

Read by both frameworks' `create_model` and by `compare.params`. Imports neither jax nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import NamedTuple

from flax_impl.common.errors import ConfigError

PARAMETER_LIMIT = 20_000  # the project's budget
MAX_WIDTH = 1024  # channels a block may have (--widths)


# A network's layers in order, one token each: "3" a 3x3 conv block and "1" a 1x1 one (each takes
# the next of the widths), "d" a depthwise 3x3 conv block (one 3x3 filter per channel: its width
# is its input's), "x" a depthwise 3x3 convolution alone (no BatchNorm, ReLU or dropout: as in
# Xception, the 1x1 block after it mixes and normalises), "M" a 2x2 max-pool. Global average
# pooling and the linear head follow. `Net`'s: 28x28 -> 26 -> 24 -> (pool) 12 -> 10 -> 8 -> 6 ->
# 4, a receptive field of 22.
NET_LAYOUT = ("3", "3", "M", "3", "3", "3", "3")
TOKENS = ("3", "1", "d", "x", "M")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A network of the table: `Net` built from `layout` (by default NET_LAYOUT: six 3x3 conv
    blocks and one max-pool) at `widths`, the channels of its "3" and "1" blocks, in order;
    `budget`: the parameter count it must stay under."""

    widths: tuple[int, ...]
    budget: int = PARAMETER_LIMIT
    layout: tuple[str, ...] = NET_LAYOUT

    def __post_init__(self):
        size = 28  # a 28x28 image must keep at least one pixel to the head
        for token in self.layout:
            if token not in TOKENS:
                raise ValueError(f"layout token {token!r} is none of {TOKENS}")
            size = size // 2 if token == "M" else size - 2 * (token != "1")
        if size < 1 or not any(token != "M" for token in self.layout):
            raise ValueError(f"layout {self.layout} leaves no conv block or no pixel")
        if len(self.widths) != self.num_widths:
            raise ValueError(f"layout {self.layout} takes {self.num_widths} widths")

    @property
    def num_widths(self) -> int:
        """How many widths the layout takes (its "3" and "1" blocks)."""
        return sum(layer in ("3", "1") for layer in self.layout)


MODELS: dict[str, ModelSpec] = {
    "net": ModelSpec((10, 16, 16, 16, 24, 32)),  # the default recipe's
    "tinynet": ModelSpec((8, 10, 12, 12, 14, 14), 7_000),
    "widenet": ModelSpec((10, 16, 20, 20, 24, 32)),  # the fast recipe's
    # Depthwise-separable blocks (a 3x3 filter per channel, then a 1x1 mix) after a 3x3 stem.
    "sepnet": ModelSpec((8, 16, 20, 20, 24, 28, 28), 5_000,
                        ("3", "d", "1", "d", "1", "M", "d", "1", "d", "1", "d", "1", "d", "1")),
    # SepNet's layout with Xception's separable convolutions, wider at the end.
    "xsepnet": ModelSpec((8, 16, 20, 24, 24, 28, 32), 5_000,
                         ("3", "x", "1", "x", "1", "M", "x", "1", "x", "1", "x", "1", "x", "1")),
}
# The seed README's network (`compare.seednet`): seven 3x3 convs, the first six of these widths.
SEEDNET_WIDTHS = (32, 64, 128, 256, 512, 1024)


def model_spec(name: str) -> ModelSpec:
    """The table's entry for `name` (ConfigError for an unknown one)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def model_widths(name: str, widths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The channels model `name` is built with: `widths` where given, else the table's."""
    spec = model_spec(name)
    if widths is None:
        return spec.widths
    widths = tuple(widths)
    if len(widths) != spec.num_widths or not all(type(w) is int and w > 0 for w in widths):
        raise ConfigError(f"--widths needs {spec.num_widths} positive integers for {name} (e.g. "
                          f"{','.join(map(str, spec.widths))}), got {','.join(map(str, widths))}")
    if max(widths) > MAX_WIDTH:  # (100,000 channels would ask for hundreds of GB)
        raise ConfigError(f"--widths: at most {MAX_WIDTH} channels a block, got {max(widths)}")
    return widths


class ConvLayer(NamedTuple):
    """One conv block of a layout: conv (no bias) -> BatchNorm -> ReLU -> channel dropout, or
    the conv alone (not `normalized`)."""

    name: str  # block1, block2, ...: the same in every port
    in_features: int
    features: int
    kernel_size: int  # 3 or 1
    groups: int  # in_features for a depthwise block, else 1
    dropout: bool  # every block but the last and the bare convs drops channels
    normalized: bool = True  # False: the conv alone ("x")


def conv_layers(layout: tuple[str, ...], widths: tuple[int, ...]) -> list[ConvLayer | str]:
    """The layers of `layout` (NET_LAYOUT's tokens) at `widths`, in order: a ConvLayer per conv
    block, "M" for a max-pool. Every port builds its network from this list."""
    ModelSpec(tuple(widths), layout=tuple(layout))  # a layout its widths fit (ValueError)
    plan: list[ConvLayer | str] = []
    widths, in_features, number = iter(widths), 1, 0
    for layer in layout:
        if layer == "M":
            plan.append("M")
            continue
        number += 1
        depthwise = layer in ("d", "x")
        features = in_features if depthwise else next(widths)
        plan.append(ConvLayer(f"block{number}", in_features, features, 1 if layer == "1" else 3,
                              in_features if depthwise else 1, dropout=layer != "x",
                              normalized=layer != "x"))
        in_features = features
    last = max(i for i, layer in enumerate(plan) if layer != "M")
    plan[last] = plan[last]._replace(dropout=False)
    return plan


def parse_widths(text: str) -> tuple[int, ...]:
    """'8,10,12,12,14,14' -> (8, 10, 12, 12, 14, 14); the `type` of a `--widths` flag (an
    argparse error, its message shown, if not integers)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, e.g. "
                                         f"8,10,12,12,14,14; got {text!r}") from None
