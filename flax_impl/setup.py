"""One run of the Flax port, set up on the devices: `setup_training(config, data)`.

Where the optional layers (`flax_impl.extras`) join the stock port: the CPU kernels, chosen by
`--kernels` and passed into the model and the train step, and the processes of a multi-process
run, joined from the flags `add_flags` defines.

Builds the model with its kernels, the initial state, the jitted chunk and evaluation of
`flax_impl.core`, the shardings and the device-resident dataset, data-parallel over a 1-D `data`
mesh of all devices (every process's, in a multi-process run): the batches' example indices are
split along it, so each device gathers and computes its own rows of every batch; the state and
the dataset are replicated. One device is a mesh of one. What is built from the settings alone
(`programs`: the model and the jitted functions) is kept for the process, so that another run
of the same settings (a resumed run, a sweep's next seed, a test's next call) traces and
compiles nothing again. Training (`flax_impl.train`), `compare.speed` and `compare.parity` all
start here, so the benchmark times what training runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl.common.config import API_CHOICES, Config
from flax_impl.common.data import Mnist
from flax_impl.common.errors import ConfigError
from flax_impl.core import (
    TrainState,
    create_optimizer,
    epoch_plan,
    eval_variables,
    initial_state,
    jit_init,
    make_evaluate,
    make_train_chunk,
    make_train_step,
    onecycle_constants,
    optimizer_of,
)
from flax_impl.extras import distributed
from flax_impl.extras.kernels import KERNELS, Kernels, get_kernels, resolve
from flax_impl.model import create_model

if TYPE_CHECKING:  # the NNX port loads only for `--api nnx` (flax.nnx is slow to import)
    from flax_impl.nnx_model import SplitModel

# Train steps per jitted call, a `lax.scan` (an epoch of 468 batches is 12 calls): fewer
# dispatches than single steps, on the CPU and the GPU (docs/performance.md).
DEFAULT_STEPS_PER_CALL = 39

# The processes of the run (one, unless `start_processes` joined several): who prints and writes,
# waiting for all, agreeing on a flag.
is_primary = distributed.is_primary
barrier = distributed.barrier
any_process = distributed.any_process


@dataclasses.dataclass(frozen=True)
class Setup:
    """One run, ready to go: initial state, jitted functions and the data, on the devices."""

    config: Config
    model: nn.Module | SplitModel
    kernels: Kernels
    state: TrainState  # the initial state, replicated over the mesh
    key: jax.Array  # the run's key; the epoch plans derive from it
    steps_per_epoch: int
    steps_per_call: int
    train_step: Callable  # pure; `train_chunk` scans it
    train_chunk: Callable
    schedule: dict  # the learning rate schedule's numbers (`core.onecycle_constants`), replicated
    epoch_plan: Callable  # `core.epoch_plan`, jitted to lay the plan out over the mesh
    evaluate: Callable
    train_data: tuple[jax.Array, jax.Array]  # uint8 images and labels, replicated
    eval_data: tuple[jax.Array, jax.Array]  # the test set, or the validation split
    replicated: NamedSharding

    def plan(self, epoch: int):
        """`epoch_plan` of this run's `epoch`: (indices (steps, B), keys (steps,)), the indices
        split over the mesh along B."""
        return self.epoch_plan(self.key, epoch, len(self.train_data[1]), self.steps_per_epoch,
                               self.config.batch_size)

    def run_chunk(self, state: TrainState, plan, first: int, stop: int):
        """Steps `first` to `stop` of an epoch's `plan` in one call: (state, {"loss": (K,)})."""
        indices, keys = plan
        return self.train_chunk(state, *self.train_data, indices[first:stop], keys[first:stop],
                                self.schedule)

    def score(self, state: TrainState) -> tuple[float, int]:
        """Mean loss and number of correct predictions on `eval_data` (a host sync)."""
        loss_sum, correct = self.evaluate(eval_variables(state), *self.eval_data)
        return float(loss_sum) / len(self.eval_data[1]), int(correct)


def setup_training(config: Config, data: Mnist, *, devices: list | None = None,
                   kernels: str | Kernels = "auto", steps_per_call: int | None = None) -> Setup:
    """Build `config`'s run on `devices` (default: all of them, every process's) with `kernels`.

    `steps_per_call` train steps run per jitted call (default: DEFAULT_STEPS_PER_CALL).
    """
    count = config.training_images(len(data.train_images))
    steps = config.steps_per_epoch(count)
    if steps == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {count} "
                          f"training images")
    mesh = Mesh(np.array(devices or jax.devices()), ("data",))
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ConfigError(f"--batch-size {config.batch_size} and the eval batch size must "
                          f"divide evenly over {mesh.size} devices")
    replicated = NamedSharding(mesh, P())
    kernels = get_kernels(kernels, batch_axis=mesh.axis_names[0] if mesh.size > 1 else None)
    total_steps = config.epochs * steps
    built = programs(program_key(config), total_steps, kernels, mesh)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    return Setup(
        config=config, model=built.model, kernels=kernels,
        state=jax.device_put(built.init(init_key), replicated), key=train_key,
        steps_per_epoch=steps, steps_per_call=steps_per_call or DEFAULT_STEPS_PER_CALL,
        train_step=built.train_step, train_chunk=built.train_chunk,
        schedule=jax.device_put(onecycle_constants(config, total_steps), replicated),
        evaluate=built.evaluate,
        train_data=jax.device_put((data.train_images[:count], data.train_labels[:count]),
                                  replicated),
        eval_data=jax.device_put(config.evaluation_set(data), replicated),
        epoch_plan=built.epoch_plan, replicated=replicated)


class Programs(NamedTuple):
    """What `setup_training` builds from a config alone: the model and the jitted functions
    (each keeps the programs it traced and compiled; the optimizer is the initial state's)."""

    model: nn.Module | SplitModel
    init: Callable  # key -> the initial TrainState (`core.create_train_state`)
    train_step: Callable
    train_chunk: Callable
    evaluate: Callable
    epoch_plan: Callable


# The config fields no program depends on (the data, the seed, labels; the run's length enters
# as its number of steps): runs that differ only in them share their programs.
NEUTRAL_FIELDS = {"recipe": "default", "epochs": 1, "seed": 0, "data_source": "auto",
                  "train_examples": None, "validation": 0}


def program_key(config: Config) -> Config:
    """`config` with its NEUTRAL_FIELDS at their defaults: what `programs` is built from."""
    return dataclasses.replace(config, **NEUTRAL_FIELDS)


@functools.lru_cache(maxsize=8)
def programs(config: Config, total_steps: int, kernels: Kernels, mesh: Mesh) -> Programs:
    """The `Programs` of `config` for a run of `total_steps` with `kernels` on `mesh`, built
    once per process: another run of the same settings (a resumed run, the next run of a
    sweep or a test) traces and compiles nothing again. `programs.cache_clear()` forgets them.
    """
    batch_sharding = NamedSharding(mesh, P("data"))
    rows = NamedSharding(mesh, P(None, "data"))  # each device gets its share of a batch's rows
    model = build_model(config, kernels)
    tx = create_optimizer(config, total_steps)
    train_step = make_train_step(config, kernels.rotate,
                                 mesh if kernels.batch_axis is not None else None)
    return Programs(
        model=model, init=jit_init(initial_state(model, tx, bool(config.ema_decay))),
        train_step=train_step,
        train_chunk=make_train_chunk(train_step, batch_sharding,
                                     functools.partial(optimizer_of, config)),
        evaluate=make_evaluate(model, config.eval_batch_size, batch_sharding),
        epoch_plan=jax.jit(epoch_plan, static_argnums=(2, 3, 4),
                           out_shardings=(rows, NamedSharding(mesh, P()))))


def build_model(config: Config, kernels: str | Kernels = "auto") -> nn.Module | SplitModel:
    """`config`'s network (model, widths, dropout) in its API (linen, or NNX behind linen's
    `init`/`apply`) with the convolution, pooling and batch normalisation of `kernels`."""
    chosen = get_kernels(kernels)
    if config.api == "nnx":
        from flax_impl import nnx_model

        return nnx_model.SplitModel.of(functools.partial(
            nnx_model.create_model, config.model, config.dropout, config.widths,
            conv_general_dilated=chosen.conv_general_dilated, max_pool=chosen.max_pool,
            normalize=chosen.batch_normalize, batch_axis=chosen.batch_axis))
    return create_model(config.model, config.dropout, config.widths, conv=chosen.conv,
                        max_pool=chosen.max_pool, normalize=chosen.batch_normalize,
                        batch_axis=chosen.batch_axis)


def describe_kernels(kernels: str | Kernels) -> str:
    """"stock", "fast" or "custom": the kernels a run uses, for its log."""
    if isinstance(kernels, Kernels):
        return "custom"
    return resolve(kernels)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The Flax-only flags: --api, and those of the optional layers: --steps-per-call, --kernels
    and the multi-process ones."""
    parser.add_argument("--api", default="linen", choices=API_CHOICES,
                        help="the network in Flax linen (flax_impl/model.py) or Flax NNX "
                             "(flax_impl/nnx_model.py); the same weights and training")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help=f"train steps per jitted call (a lax.scan); default: "
                             f"{DEFAULT_STEPS_PER_CALL}")
    parser.add_argument("--kernels", default="auto", choices=KERNELS,
                        help="stock: nn.Conv, nn.max_pool, gather rotation; fast: the CPU "
                             "kernels of flax_impl.extras.fast; auto: fast on CPU, stock "
                             "elsewhere")
    distributed.add_flags(parser)


def start_processes(args: argparse.Namespace) -> str | None:
    """Check the flags of `add_flags` and join the multi-process run they ask for (nothing for a
    single process); this process's name in the run ("process 0 of 2"), None for a single one."""
    if args.steps_per_call is not None and args.steps_per_call <= 0:
        raise ConfigError(f"--steps-per-call must be > 0, got {args.steps_per_call}")
    distributed.initialize(distributed.cluster_from_args(args))
    return distributed.describe()


def stops_together():
    """A context for the training: a stop all processes take leaves the run together (see
    `distributed.stops_together`)."""
    return distributed.stops_together()


def leave(exit_code: int) -> int:
    """`exit_code`, or (a failed multi-process run) exit at once: see `distributed.leave`."""
    return distributed.leave(exit_code)
