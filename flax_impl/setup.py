"""One run of the Flax port, set up on the devices: `setup_training(config, data)`.

Builds the model with its kernels, the initial state, the jitted chunk and evaluation of
`flax_impl.core`, the shardings and the device-resident dataset, data-parallel over a 1-D `data`
mesh of all devices (every process's, in a multi-process run): the batches' example indices are
split along it, so each device gathers and computes its own rows of every batch; the state and
the dataset are replicated. One device is a mesh of one. Training (`flax_impl.train`),
`compare.speed` and `compare.parity` all start here, so the benchmark times what training runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl.config import Config, ConfigError
from flax_impl.core import (
    TrainState,
    create_optimizer,
    create_train_state,
    epoch_plan,
    eval_variables,
    make_evaluate,
    make_train_chunk,
    make_train_step,
)
from flax_impl.data import Mnist
from flax_impl.kernels import Kernels, get_kernels
from flax_impl.model import create_model

# Train steps per jitted call, a `lax.scan` (an epoch of 468 batches is 12 calls): faster than
# single steps on the CPU (1.06x) and on an H200 (2.15x); results/speed.txt, results/gpu/.
DEFAULT_STEPS_PER_CALL = 39


@dataclasses.dataclass(frozen=True)
class Setup:
    """One run, ready to go: initial state, jitted functions and the data, on the devices."""

    config: Config
    model: nn.Module
    kernels: Kernels
    state: TrainState  # the initial state, replicated over the mesh
    key: jax.Array  # the run's key; the epoch plans derive from it
    steps_per_epoch: int
    steps_per_call: int
    train_step: Callable  # pure; `train_chunk` scans it
    train_chunk: Callable
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
        return self.train_chunk(state, *self.train_data, indices[first:stop], keys[first:stop])

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
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rows = NamedSharding(mesh, P(None, "data"))  # each device gets its share of a batch's rows
    kernels = get_kernels(kernels)
    model = create_model(config.model, config.dropout, kernels)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(init_key, model, create_optimizer(config, config.epochs * steps),
                               ema=bool(config.ema_decay))
    train_step = make_train_step(config, kernels.rotate)
    return Setup(
        config=config, model=model, kernels=kernels,
        state=jax.device_put(state, replicated), key=train_key, steps_per_epoch=steps,
        steps_per_call=steps_per_call or DEFAULT_STEPS_PER_CALL, train_step=train_step,
        train_chunk=make_train_chunk(train_step, batch_sharding),
        evaluate=make_evaluate(model, config.eval_batch_size, batch_sharding),
        train_data=jax.device_put((data.train_images[:count], data.train_labels[:count]),
                                  replicated),
        eval_data=jax.device_put(config.evaluation_set(data), replicated),
        epoch_plan=jax.jit(epoch_plan, static_argnums=(2, 3, 4), out_shardings=(rows, replicated)),
        replicated=replicated)
