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

from flax_impl.common.data import SOURCES
from flax_impl.common.errors import ConfigError
from flax_impl.common.models import MODELS, model_widths, parse_widths


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. The defaults are the documented ("default") recipe."""

    recipe: str = "default"  # the preset the other fields started from (RECIPES)
    model: str = "net"  # a key of flax_impl.common.models.MODELS
    widths: tuple[int, ...] | None = None  # the conv blocks' channels; None: the model's own
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
    label_smoothing: float = 0.0  # torch's cross_entropy(label_smoothing=...)
    seed: int = 0
    data_source: str = "auto"
    train_examples: int | None = None  # use only the first N training images (smoke tests)
    # Hold out the last N training images and score each epoch on them instead of the test set
    # (for choosing a recipe without looking at the test set).
    validation: int = 0
    eval_batch_size: int = 1000
    api: str = "linen"  # the Flax API of the network (API_CHOICES); torch_ref has one

    def __post_init__(self):
        if self.widths is not None:  # any sequence (a JSON list): a tuple, so a Config hashes
            object.__setattr__(self, "widths", tuple(self.widths))

    def training_images(self, available: int) -> int:
        """How many of the `available` training images the run trains on: the first ones, of
        those not held out for validation (ConfigError if too few)."""
        usable = available - self.validation
        if usable <= 0:
            raise ConfigError(f"--validation {self.validation} leaves none of the {available} "
                              f"training images to train on")
        if self.train_examples and self.train_examples > usable:
            raise ConfigError(f"--train-examples {self.train_examples} is more than the "
                              f"{usable} training images" + (" not held out for validation"
                                                              if self.validation else ""))
        return self.train_examples or usable

    def evaluation_set(self, mnist) -> tuple:
        """(images, labels) each epoch is scored on: the test set, or the validation split."""
        if self.validation:
            return mnist.train_images[-self.validation:], mnist.train_labels[-self.validation:]
        return mnist.test_images, mnist.test_labels

    @property
    def eval_split(self) -> str:
        """"val" or "test": the prefix of the evaluation's metrics (val_accuracy, ...)."""
        return "val" if self.validation else "test"

    def steps_per_epoch(self, num_train: int) -> int:
        """Full batches per epoch; the last partial batch is dropped. ConfigError if there is
        none, or if the run is too short for its schedule: the warm-up must end after step 0
        (torch's OneCycleLR divides by its length)."""
        if num_train < self.batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the {num_train} "
                              f"training images")
        total = self.epochs * (num_train // self.batch_size)
        if self.warmup_fraction * total <= 1:
            raise ConfigError(f"--warmup-fraction {self.warmup_fraction} of this run's {total} "
                              f"steps ends the warm-up at step 0: give more steps (--epochs, "
                              f"--train-examples, --batch-size) or a larger --warmup-fraction")
        return num_train // self.batch_size

    def check_devices(self, devices: int) -> None:
        """ConfigError unless the batches divide evenly over `devices`."""
        if self.batch_size % devices or self.eval_batch_size % devices:
            raise ConfigError(f"--batch-size {self.batch_size} and the eval batch size "
                              f"({self.eval_batch_size}) must divide evenly over {devices} "
                              f"devices")

    def to_json(self) -> str:
        """The config as indented JSON (what `config.json` in a workdir holds)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Each recipe: the fields it changes from the dataclass defaults (the "default" recipe).
RECIPES: dict[str, dict] = {
    "default": {},
    # TinyNet trains without dropout: at this width it underfits rather than overfits
    # (chosen on the validation split, docs/recipes.md).
    "tinynet": {"model": "tinynet", "dropout": 0.0},
    # 3 epochs, chosen on the validation split (docs/recipes.md). In 3 epochs the network
    # underfits: no dropout, the widest shape under 20k, label smoothing, four times the peak
    # rate.
    "fast": {"model": "widenet", "epochs": 3, "lr": 0.4, "dropout": 0.0,
             "label_smoothing": 0.1},
    # SepNet, under 5,000 parameters: TinyNet's recipe (chosen on the validation split,
    # docs/recipes.md).
    "sepnet": {"model": "sepnet", "dropout": 0.0},
    # XSepNet, under 5,000 parameters: TinyNet's recipe (chosen on the validation split,
    # docs/recipes.md).
    "xsepnet": {"model": "xsepnet", "dropout": 0.0},
}


API_CHOICES = ("linen", "nnx")


def recipe_config(recipe: str = "default", **overrides) -> Config:
    """The Config of `recipe` (a key of RECIPES), with `overrides` applied on top."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return dataclasses.replace(Config(recipe=recipe), **{**RECIPES[recipe], **overrides})


def validate(config: Config) -> Config:
    """Raise ConfigError for values no run can use; return `config` unchanged."""
    model_widths(config.model, config.widths)  # a known model, and its number of widths
    if config.api not in API_CHOICES:
        raise ConfigError(f"--api must be one of {', '.join(API_CHOICES)}, got {config.api!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**32:  # what both frameworks' generators take
        raise ConfigError(f"--seed must be in [0, 2**32), got {config.seed}")
    if config.validation < 0:
        raise ConfigError(f"--validation must be >= 0, got {config.validation}")
    if config.train_examples is not None and config.train_examples <= 0:
        raise ConfigError(f"--train-examples must be > 0, got {config.train_examples}")
    for name in ("lr", "weight_decay", "dropout", "max_rotation", "label_smoothing",
                 "warmup_fraction"):  # NaN passes every comparison
        if not math.isfinite(getattr(config, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got "
                              f"{getattr(config, name)}")
    if config.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {config.lr}")
    if not 0 < config.warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction must be in (0, 1), got {config.warmup_fraction}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {config.dropout}")
    if not 0 <= config.max_rotation <= 180:
        raise ConfigError(f"--max-rotation must be in [0, 180] degrees, got {config.max_rotation}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    return config


KERNEL_CHOICES = ("auto", "stock", "fast")
STEPS_PER_CALL = 39  # Flax's train steps per jitted call (docs/performance.md)


def positive_int(text: str) -> int:
    """An integer > 0; the `type` of such a flag (an argparse error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes an integer > 0, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, its errors one line (not the usage block): "PROG: error: ...; see --help"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def workdir_path(text: str) -> Path:
    """A --workdir value: a directory path, never empty (an unset shell variable would make it
    the current directory, which --overwrite would clear)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a directory (an unset variable?)")
    return Path(text)


def build_parser(prog: str, description: str, framework: str = "torch"
                 ) -> argparse.ArgumentParser:
    """The flags of a training command, with the recipe's defaults; `framework` "flax" adds
    the Flax-only ones (--api, --steps-per-call, --kernels)."""
    defaults = Config()
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", default=defaults.recipe, choices=RECIPES,
                        help="the preset of the flags below; each one given overrides it")

    def recipe_flag(name: str, help: str = "", **kwargs):
        # Left out, the recipe's value applies (absent from the namespace); the default recipe's
        # is shown.
        shown = getattr(defaults, name.removeprefix("--").replace("-", "_"))
        parser.add_argument(name, default=argparse.SUPPRESS,
                            help=f"{help} (default recipe: {shown})".strip(), **kwargs)

    recipe_flag("--model", "network to train (flax_impl/common/models.py)", choices=MODELS)
    parser.add_argument("--widths", type=parse_widths, default=None, metavar="W1,W2,...",
                        help="the channels of the model's conv blocks, e.g. 8,10,12,12,14,14 for "
                             "net (default: "
                             "the model's own, flax_impl/common/models.py)")
    recipe_flag("--epochs", type=int)
    recipe_flag("--batch-size", type=int)
    recipe_flag("--lr", "peak learning rate", type=float)
    recipe_flag("--warmup-fraction", "the share of the steps spent warming up to the peak",
                type=float)
    recipe_flag("--weight-decay", type=float)
    recipe_flag("--dropout", type=float)
    recipe_flag("--max-rotation", "random rotation range in degrees (0 disables augmentation)",
                type=float)
    recipe_flag("--label-smoothing", type=float)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-source", default=defaults.data_source,
                        help=f"where MNIST comes from: {', '.join(SOURCES)}")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N images only (quick smoke runs)")
    parser.add_argument("--validation", type=int, default=defaults.validation, metavar="N",
                        help="hold out the last N training images and score each epoch on them "
                             "instead of the test set (0: the test set)")
    parser.add_argument("--workdir", type=workdir_path, default=None,
                        help="directory for metrics.jsonl, config.json and checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another run's results in --workdir")
    if framework == "flax":
        parser.add_argument("--api", default=defaults.api, choices=API_CHOICES,
                            help="the network in Flax linen (flax_impl/model.py) or Flax NNX "
                                 "(flax_impl/nnx_model.py)")
        parser.add_argument("--steps-per-call", type=positive_int, default=STEPS_PER_CALL,
                            help="train steps per jitted call (a lax.scan)")
        parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                            help="stock: nn.Conv, nn.max_pool, gather rotation; fast: the CPU "
                                 "kernels of flax_impl/extras/fast; auto: fast on the CPU")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated Config the parsed flags describe: the recipe, then the flags given."""
    if getattr(args, "resume", False) and args.workdir is None:
        raise ConfigError("--resume continues the run in --workdir: give --workdir")
    if getattr(args, "overwrite", False) and args.workdir is None:
        raise ConfigError("--overwrite replaces the run in --workdir: give --workdir")
    fields = {f.name for f in dataclasses.fields(Config)} - {"recipe"}
    given = {k: v for k, v in vars(args).items() if k in fields}
    return validate(recipe_config(args.recipe, **given))


def flags_record(config: Config, args: argparse.Namespace, own: tuple[str, ...] = ()) -> dict:
    """What the processes of a run must agree on: the config's fields and every flag given, as
    JSON values, but the process's `own` flags (its --process-id)."""
    flags = {k: str(v) for k, v in vars(args).items() if k not in own}
    return {**flags, **json.loads(config.to_json())}


def check_same_flags(records: list[dict]) -> None:
    """ConfigError unless every process of a run (its `records`, in process order: the config's
    fields and the framework's own flags) was started with the same flags."""
    for index, record in enumerate(records[1:], start=1):
        differ = sorted(k for k in record.keys() | records[0].keys()
                        if record.get(k) != records[0].get(k))
        if differ:
            raise ConfigError(f"process {index} was started with other flags than process 0 "
                              f"({', '.join(differ)}): start every process with the same flags")
