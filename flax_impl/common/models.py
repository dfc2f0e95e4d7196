"""The model table: each network's name, shape and parameter budget, defined once.

Read by both frameworks' `create_model` and by `compare.params`. Imports neither jax nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses

from flax_impl.common.errors import ConfigError

PARAMETER_LIMIT = 20_000  # the project's budget


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A network of the table: `Net` (six 3x3 conv blocks, one max-pool, global average pooling,
    a linear head) at `widths`, the six blocks' channels; `budget`: the parameter count it must
    stay under."""

    widths: tuple[int, ...]
    budget: int = PARAMETER_LIMIT


MODELS: dict[str, ModelSpec] = {
    "net": ModelSpec((10, 16, 16, 16, 24, 32)),  # the default recipe's
    "tinynet": ModelSpec((8, 10, 12, 12, 14, 14), 7_000),
    "widenet": ModelSpec((10, 16, 20, 20, 24, 32)),  # the fast recipe's
}
# The seed README's network (`compare.seednet`): seven 3x3 convs, the first six of these widths.
SEEDNET_WIDTHS = (32, 64, 128, 256, 512, 1024)
NUM_WIDTHS = 6


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
    if len(widths) != NUM_WIDTHS or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ConfigError(f"--widths needs {NUM_WIDTHS} positive integers (e.g. "
                          f"{','.join(map(str, spec.widths))}), got {','.join(map(str, widths))}")
    return widths


def parse_widths(text: str) -> tuple[int, ...]:
    """'8,10,12,12,14,14' -> (8, 10, 12, 12, 14, 14); the `type` of a `--widths` flag (an
    argparse error, its message shown, if not integers)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes {NUM_WIDTHS} comma-separated integers, e.g. "
                                         f"8,10,12,12,14,14; got {text!r}") from None
