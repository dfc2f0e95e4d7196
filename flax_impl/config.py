"""The training recipe and its command line, shared by `flax_impl.train` and `torch_ref.train`.

The recipe's numbers live here once; each framework implements them in its own idiom and the
tests in `tests/` prove the two implementations equal. Imports neither jax nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from flax_impl.data import SOURCES

MODELS = ("net", "seednet")


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. The defaults are the documented recipe."""

    model: str = "net"
    epochs: int = 20
    batch_size: int = 128
    # SGD with Nesterov momentum and L2 weight decay (torch's `weight_decay`, on every parameter).
    lr: float = 0.1  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # One-cycle schedule, exactly torch's OneCycleLR(anneal_strategy="cos", cycle_momentum=False).
    warmup_fraction: float = 0.3  # OneCycleLR's pct_start
    div_factor: float = 25.0  # initial lr = lr / div_factor
    final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
    # Augmentation and regularisation.
    max_rotation: float = 7.0  # degrees; each training image is rotated by U(-max, max)
    dropout: float = 0.05
    seed: int = 0
    data_source: str = "auto"
    train_examples: int | None = None  # use only the first N training images (smoke tests)
    eval_batch_size: int = 1000

    def training_images(self, available: int) -> int:
        """How many of the `available` training images the run uses (ConfigError if too few)."""
        if self.train_examples and self.train_examples > available:
            raise ConfigError(f"--train-examples {self.train_examples} is more than the "
                              f"{available} training images")
        return self.train_examples or available

    def steps_per_epoch(self, num_train: int) -> int:
        """Full batches per epoch; the last partial batch is dropped."""
        return num_train // self.batch_size

    def to_json(self) -> str:
        """The config as indented JSON (what `config.json` in a workdir holds)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


class ConfigError(ValueError):
    """A bad flag value, described in one line."""


def validate(config: Config) -> Config:
    """Raise ConfigError for values no run can use; return `config` unchanged."""
    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if config.train_examples is not None and config.train_examples <= 0:
        raise ConfigError(f"--train-examples must be > 0, got {config.train_examples}")
    for name in ("lr", "weight_decay", "dropout", "max_rotation"):  # NaN passes every comparison
        if not math.isfinite(getattr(config, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got "
                              f"{getattr(config, name)}")
    if config.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {config.lr}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.max_rotation < 0:
        raise ConfigError(f"--max-rotation must be >= 0, got {config.max_rotation}")
    return config


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags both training commands take, with the recipe's defaults."""
    defaults = Config()
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=defaults.model, choices=MODELS,
                        help="network to train (seednet is the seed README's >20k base network)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--max-rotation", type=float, default=defaults.max_rotation,
                        help="random rotation range in degrees (0 disables augmentation)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-source", default=defaults.data_source,
                        help=f"where MNIST comes from: {', '.join(SOURCES)}")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N images only (quick smoke runs)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="directory for metrics.jsonl, config.json and checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another run's results in --workdir")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated Config the parsed flags describe."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return validate(Config(**{k: v for k, v in vars(args).items() if k in fields}))
