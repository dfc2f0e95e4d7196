"""The functional core of the Flax port: state, optimizer, train step, chunked scan, evaluation.

Pure functions over pytrees, everything that runs per step inside `jax.jit`:

- `TrainState`: Flax's `TrainState` plus BatchNorm's running statistics and, when the recipe
  asks for one, an exponential moving average of the parameters;
- `onecycle_schedule` and `create_optimizer`: torch's SGD and OneCycleLR, step for step (the
  schedule's numbers, `onecycle_constants`, passed into the jitted chunk as values);
- `make_train_step`: `train_step(state, (images, labels), key) -> (state, metrics)` rotates,
  normalises, differentiates and updates;
- `make_train_chunk`: a jitted `lax.scan` of the train step over a chunk of an epoch's batches,
  gathered on device from the uploaded dataset (fewer dispatches than a loop of jitted steps);
- `make_evaluate`: summed loss and correct predictions over a set of images;
- `epoch_plan`: each epoch's batches and step keys, from the run's key and the epoch number;
- `chunk_bounds`: the steps of each jitted call of an epoch.

`flax_impl.setup` builds all of it for one config on the devices; the run layer around it
(workdir, checkpoints, signals, command line) is `flax_impl.train`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl.augment import random_rotate, rotate
from flax_impl.common.config import Config
from flax_impl.model import to_inputs

# For the programs that run once or once an epoch (the initialisation, the evaluation): XLA's
# backend optimisation level 1 compiles in a fraction of level 2's time to the same bits.
LIGHT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class TrainState(train_state.TrainState):
    """Step, parameters, optimizer state (Flax's TrainState), BatchNorm statistics, and the
    moving average of the parameters ({} without one)."""

    batch_stats: Any
    ema_params: Any = dataclasses.field(default_factory=dict)


def onecycle_constants(config: Config, total_steps: int) -> dict[str, np.float32]:
    """The numbers of `onecycle_schedule` for a run of `total_steps`, float32, computed on the
    host: the values XLA folds the schedule's constants into, so that the train chunk can take
    them as arguments (one compiled program for every run length and peak rate) and compute the
    same bits."""
    f32 = np.float32
    initial = config.lr / config.div_factor
    final = initial / config.final_div_factor
    warmup_end = config.warmup_fraction * total_steps - 1
    decay_steps = total_steps - 1 - warmup_end
    half_pi = f32(np.pi / 2)
    return {"peak": f32(config.lr), "warmup_span": f32(initial - config.lr),
            "warmup_end": f32(warmup_end), "warmup_rate": f32(1) / f32(warmup_end) * half_pi,
            "final": f32(final), "decay_span": f32(config.lr - final),
            "last_step": f32(total_steps - 1), "decay_rate": f32(1) / f32(decay_steps) * half_pi}


def onecycle_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """torch's OneCycleLR(anneal_strategy="cos", cycle_momentum=False), step for step.

    Cosine warm-up from lr/div_factor to lr until step warmup_fraction*total_steps - 1, then cosine
    decay to lr/div_factor/final_div_factor at step total_steps - 1 (torch's phase boundaries,
    which differ by one step from `optax.cosine_onecycle_schedule`'s).
    """
    return schedule_of(onecycle_constants(config, total_steps))


def schedule_of(constants: dict) -> optax.Schedule:
    """The one-cycle schedule of `onecycle_constants` (host numbers or traced values)."""
    c = constants

    def anneal(stop, span, remaining_steps, rate):  # stop + span at the phase's first step
        # torch's stop + span / 2 * (cos(pi f) + 1), f the fraction done, written as
        # sin(pi (1 - f) / 2)^2 so that float32 keeps its relative precision where the rate
        # is tiny (the last steps).
        return stop + span * jnp.square(jnp.sin(remaining_steps * rate))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warming = anneal(c["peak"], c["warmup_span"], c["warmup_end"] - step, c["warmup_rate"])
        decaying = anneal(c["final"], c["decay_span"], c["last_step"] - step, c["decay_rate"])
        return jnp.where(step <= c["warmup_end"], warming, decaying)

    return schedule


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """torch's SGD(nesterov=True, weight_decay=wd): L2 decay added to the gradient, then SGD."""
    return optimizer_of(config, onecycle_constants(config, total_steps))


def optimizer_of(config: Config, schedule_constants: dict) -> optax.GradientTransformation:
    """`create_optimizer` with the schedule of `schedule_constants` (`onecycle_constants`)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule_of(schedule_constants), config.momentum, nesterov=True),
    )


def create_train_state(key: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       ema: bool = False) -> TrainState:
    """Initial parameters (torch's default initialisation), BatchNorm statistics, optimizer state
    and, with `ema`, the moving average of the parameters (their copy until the first step)."""
    # One compiled program instead of one per operation of the initialisation: the same values.
    return jit_init(initial_state(model, tx, ema))(key)


def train_state_shapes(model: nn.Module, tx: optax.GradientTransformation,
                       ema: bool = False) -> TrainState:
    """The shapes and dtypes of `create_train_state`'s state (jax.ShapeDtypeStruct leaves),
    traced without compiling: a target to restore a checkpoint into."""
    return jax.eval_shape(initial_state(model, tx, ema), jax.random.key(0))


def initial_state(model: nn.Module, tx: optax.GradientTransformation, ema: bool) -> Callable:
    """key -> the initial TrainState of `model` and `tx` (see `create_train_state`)."""

    def create(key):
        variables = model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
        state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                  batch_stats=variables.get("batch_stats", {}),
                                  # a copy: a donated state must not hold one buffer twice
                                  ema_params=jax.tree.map(jnp.copy, variables["params"])
                                  if ema else {})
        return state.replace(step=jnp.zeros((), jnp.int32))

    return create


def jit_init(init: Callable) -> Callable:
    """`init` jitted for a program that runs once (an initialisation): at XLA's backend
    optimisation level 1 (`LIGHT_COMPILER_OPTIONS`), a fraction of level 2's compile time and the
    same bits (level 0 would fuse no multiply-add and round differently)."""
    return jax.jit(init, compiler_options=LIGHT_COMPILER_OPTIONS)


def variables_of(state: TrainState) -> dict:
    """The model variables ({"params", "batch_stats"}) of a train state."""
    if state.batch_stats:
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def eval_variables(state: TrainState) -> dict:
    """The variables that are scored and saved as the model: with a moving average of the
    parameters, it with the live BatchNorm statistics (torch's AveragedModel keeps those in
    sync the same way)."""
    return variables_of(state.replace(params=state.ema_params) if state.ema_params else state)


def update_ema(ema_params, params, decay: float, step: jax.Array):
    """decay * ema + (1 - decay) * params; the parameters themselves after the first step (as
    torch's AveragedModel with get_ema_multi_avg_fn)."""
    return jax.tree.map(lambda e, p: jnp.where(step == 0, p, decay * e + (1 - decay) * p),
                        ema_params, params)


def example_nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Each example's negative log-likelihood of its label, (B,)."""
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


def nll_loss(log_probs: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean negative log-likelihood (torch's F.nll_loss); with `label_smoothing` e, torch's
    cross_entropy(label_smoothing=e): (1 - e) NLL + e * the mean over classes of -log p."""
    nll = example_nll(log_probs, labels)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    return nll.mean()


def value_and_grad_over(loss_fn: Callable, mesh: Mesh) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` for `loss_fn(params, batch_stats, inputs,
    labels, key)` whose inputs and labels are spread over the devices of the 1-D `mesh` (its
    axis is the model's `batch_axis`).

    Inside `jax.shard_map` each device differentiates the mean loss of its rows (the model's
    BatchNorm and dropout see the whole batch through `axis`); then the gradients and the loss
    cross the devices in one all-reduce of one flat buffer. XLA, left to split the step itself,
    reduces the gradients as a tuple of arrays, which XLA:CPU runs as one all-reduce per array.
    """

    (axis,) = mesh.axis_names

    def local(params, batch_stats, inputs, labels, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, inputs, labels, key)
        flat, unflatten = ravel_pytree((grads, loss))
        # Each device's loss is the mean of its equal share: the batch's mean is their mean.
        grads, loss = unflatten(jax.lax.psum(flat, axis) / jax.lax.psum(1, axis))
        return (loss, aux), grads

    split, whole = P(axis), P()
    return jax.shard_map(local, mesh=mesh, in_specs=(whole, whole, split, split, whole),
                         out_specs=whole, check_vma=False)


def make_train_step(config: Config, rotate_fn: Callable = rotate, mesh: Mesh | None = None):
    """The pure train step of `config`: (state, (images, labels), key) -> (state, metrics).

    Images are uint8 (B, 28, 28); `rotate_fn` is `augment.rotate` or a drop-in. `mesh`: for a
    model built to train each device's share of the batch (its `batch_axis`), the devices
    (`value_and_grad_over`); None: one program that XLA splits over the batch's devices.
    """

    def train_step(state: TrainState, batch, key: jax.Array):
        images, labels = batch
        rotate_key, dropout_key = jax.random.split(key)
        inputs = to_inputs(images, lambda pixels: random_rotate(
            pixels, config.max_rotation, rotate_key, rotate_fn))

        def loss_fn(params, batch_stats, inputs, labels, dropout_key):
            log_probs, updates = state.apply_fn(
                variables_of(state.replace(params=params, batch_stats=batch_stats)), inputs,
                train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            loss = nll_loss(log_probs, labels, config.label_smoothing)
            return loss, updates.get("batch_stats", {})

        differentiate = (jax.value_and_grad(loss_fn, has_aux=True) if mesh is None
                         else value_and_grad_over(loss_fn, mesh))
        (loss, batch_stats), grads = differentiate(state.params, state.batch_stats, inputs,
                                                   labels, dropout_key)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if config.ema_decay:
            new_state = new_state.replace(ema_params=update_ema(
                state.ema_params, new_state.params, config.ema_decay, state.step))
        return new_state, {"loss": loss}

    return train_step


def make_train_chunk(train_step, batch_sharding: NamedSharding, optimizer: Callable):
    """Jitted: run `train_step` over rows of `indices` (K, B) with `keys` (K,) in one `lax.scan`.

    `schedule` is the run's `onecycle_constants` as arguments and `optimizer(schedule)` the
    state's optimizer built on them (`functools.partial(optimizer_of, config)`), so that runs of
    other lengths and rates share the compiled program.
    """

    def train_chunk(state, images, labels, indices, keys, schedule):
        def body(state, step_input):
            index, key = step_input
            batch = jax.lax.with_sharding_constraint((images[index], labels[index]),
                                                     batch_sharding)
            return train_step(state, batch, key)

        # The state's optimizer has the schedule's numbers as constants; the one the steps use
        # reads them from `schedule` (the same bits, see `onecycle_constants`).
        state_tx = state.tx
        state, metrics = jax.lax.scan(body, state.replace(tx=optimizer(schedule)),
                                      (indices, keys))
        return state.replace(tx=state_tx), metrics

    return jax.jit(train_chunk, donate_argnums=0)


def make_evaluate(model: nn.Module, batch_size: int, batch_sharding: NamedSharding):
    """Jitted: (variables, uint8 images, labels) -> (summed NLL loss, number correct).

    Compiled at `LIGHT_COMPILER_OPTIONS` (it runs once an epoch; the same bits, no slower)."""

    @functools.partial(jax.jit, compiler_options=LIGHT_COMPILER_OPTIONS)
    def evaluate(variables, images, labels):
        count = images.shape[0]
        padded = math.ceil(count / batch_size) * batch_size
        mask = jnp.arange(padded) < count
        images = jnp.pad(images, ((0, padded - count), (0, 0), (0, 0)))
        labels = jnp.pad(labels, (0, padded - count))

        def batch_totals(batch):
            images, labels, mask = jax.lax.with_sharding_constraint(batch, batch_sharding)
            log_probs = model.apply(variables, to_inputs(images), train=False)
            losses = example_nll(log_probs, labels)
            correct = log_probs.argmax(-1) == labels
            return jnp.sum(losses * mask), jnp.sum(correct & mask)

        shape = lambda x: x.reshape(-1, batch_size, *x.shape[1:])  # noqa: E731
        losses, correct = jax.lax.map(batch_totals, (shape(images), shape(labels), shape(mask)))
        return losses.sum(), correct.sum()

    return evaluate


def epoch_plan(key: jax.Array, epoch: int, num_train: int, steps: int, batch_size: int):
    """The batches' example indices (steps, B) and the step keys (steps,) of one epoch.

    Derived from the run's key and the epoch number alone, so a resumed run repeats them.
    """
    epoch_key = jax.random.fold_in(key, epoch)
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_train)
    indices = order[:steps * batch_size].reshape(steps, batch_size)
    return indices, jax.random.split(jax.random.fold_in(epoch_key, 1), steps)


def chunk_bounds(steps: int, steps_per_call: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """(first step, stop step) of each jitted call of an epoch of `steps`, from step `first`."""
    for start in range(first, steps, steps_per_call):
        yield start, min(start + steps_per_call, steps)
