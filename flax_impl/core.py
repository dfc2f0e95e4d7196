"""The functional core of the Flax port: schedule, optimizer, train state, train step, evaluation.

Pure functions over pytrees, jitted and run by `flax_impl.train`. The NNX port (`nnx_train`) shares
the optimizer, the loss, the chunk and the evaluation, and has its own state and step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flax_impl.augment import random_rotate, rotate
from flax_impl.common.config import Config
from flax_impl.model import create_model, to_inputs


def onecycle_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """torch's OneCycleLR(anneal_strategy="cos", cycle_momentum=False), step for step.

    Cosine warm-up from lr/div_factor to lr until step warmup_fraction*total_steps - 1, then cosine
    decay to lr/div_factor/final_div_factor at step total_steps - 1 (torch's phase boundaries,
    which differ by one step from `optax.cosine_onecycle_schedule`'s).
    """
    peak, initial = config.lr, config.lr / config.div_factor
    final = initial / config.final_div_factor
    warmup_end = config.warmup_fraction * total_steps - 1
    last_step = total_steps - 1

    def anneal(start, stop, remaining_steps, phase_steps):
        # torch's stop + (start - stop) / 2 * (cos(pi f) + 1), f the fraction done, written as
        # sin(pi (1 - f) / 2)^2 so that float32 keeps its relative precision where the rate is
        # tiny (the last steps).
        rate = jnp.float32(1) / jnp.float32(phase_steps) * jnp.float32(math.pi / 2)
        return stop + jnp.float32(start - stop) * jnp.square(jnp.sin(remaining_steps * rate))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warming = anneal(initial, peak, warmup_end - step, warmup_end)
        decaying = anneal(peak, final, last_step - step, last_step - warmup_end)
        return jnp.where(step <= warmup_end, warming, decaying)

    return schedule


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """torch's SGD(nesterov=True, weight_decay=wd) under OneCycleLR: L2 decay added to the
    gradient, then SGD with the schedule's rate."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(onecycle_schedule(config, total_steps), config.momentum, nesterov=True),
    )


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


def train_inputs(config: Config, images: jax.Array, key: jax.Array,
                 rotate_fn: Callable = rotate) -> jax.Array:
    """uint8 training images -> the model's input, each rotated by a random angle (`rotate_fn`:
    `augment.rotate` or a drop-in)."""
    return to_inputs(images, lambda pixels: random_rotate(pixels, config.max_rotation, key,
                                                          rotate_fn))


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, parameters, optimizer state) and BatchNorm's statistics."""

    batch_stats: Any


def create_train_state(key: jax.Array, model, tx: optax.GradientTransformation) -> TrainState:
    """Initial parameters (torch's default initialisation), statistics and optimizer state."""
    variables = model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"]
                             ).replace(step=jnp.zeros((), jnp.int32))


def variables_of(state: TrainState) -> dict:
    """The model's variables, {"params", "batch_stats"}."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_step(state: TrainState, batch, key: jax.Array, *, config: Config,
               rotate_fn: Callable = rotate) -> tuple[TrainState, dict]:
    """One step of SGD on uint8 `batch` = (images (B, 28, 28), labels (B,)): rotate,
    normalise, differentiate the loss, update; (new state, {"loss"})."""
    images, labels = batch
    rotate_key, dropout_key = jax.random.split(key)
    inputs = train_inputs(config, images, rotate_key, rotate_fn)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        log_probs, updates = state.apply_fn(variables, inputs, train=True,
                                            rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return nll_loss(log_probs, labels, config.label_smoothing), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), {"loss": loss}


def log_probs(state: TrainState, inputs: jax.Array) -> jax.Array:
    """The model's log-probabilities of `inputs`, in evaluation mode."""
    return state.apply_fn(variables_of(state), inputs)


class Port(NamedTuple):
    """The pure functions of one API's port (linen or NNX) of a config."""

    init: Callable  # key -> the initial train state
    train_step: Callable  # (state, batch, key) -> (state, {"loss"})
    log_probs: Callable  # (state, inputs) -> the model's log-probabilities, in evaluation mode
    variables: Callable  # state -> the model's linen variables {"params", "batch_stats"}


def create_port(config: Config, tx: optax.GradientTransformation, kernels) -> Port:
    """The linen port of `config`, with `kernels`' convolution, pooling and rotation."""
    model = create_model(config.model, config.dropout, config.widths, conv=kernels.conv,
                         max_pool=kernels.max_pool)
    return Port(init=lambda key: create_train_state(key, model, tx),
                train_step=functools.partial(train_step, config=config, rotate_fn=kernels.rotate),
                log_probs=log_probs, variables=variables_of)


def make_train_chunk(train_step: Callable, batch_sharding) -> Callable:
    """Jitted: `train_step` over the rows of `indices` (K, B) with `keys` (K,) in one `lax.scan`,
    each batch gathered on the device from the uploaded `images` and `labels` (fewer dispatches
    than a loop of jitted steps); (state, {"loss": (K,)})."""

    def train_chunk(state, images, labels, indices, keys):
        def body(state, step):
            index, key = step
            batch = jax.lax.with_sharding_constraint((images[index], labels[index]),
                                                     batch_sharding)
            return train_step(state, batch, key)

        return jax.lax.scan(body, state, (indices, keys))

    return jax.jit(train_chunk, donate_argnums=0)


def make_evaluate(log_probs: Callable, batch_size: int, batch_sharding) -> Callable:
    """Jitted: (state, uint8 images, labels) -> (summed NLL loss, number correct), batch by
    batch; `log_probs(state, inputs)` is the scored model."""

    @jax.jit
    def evaluate(state, images, labels):
        count = images.shape[0]
        padded = math.ceil(count / batch_size) * batch_size
        mask = jnp.arange(padded) < count
        images = jnp.pad(images, ((0, padded - count), (0, 0), (0, 0)))
        labels = jnp.pad(labels, (0, padded - count))

        def batch_totals(batch):
            images, labels, mask = jax.lax.with_sharding_constraint(batch, batch_sharding)
            scores = log_probs(state, to_inputs(images))
            return (jnp.sum(example_nll(scores, labels) * mask),
                    jnp.sum((scores.argmax(-1) == labels) & mask))

        batches = [x.reshape(-1, batch_size, *x.shape[1:]) for x in (images, labels, mask)]
        losses, correct = jax.lax.map(batch_totals, batches)
        return losses.sum(), correct.sum()

    return evaluate


def epoch_plan(key: jax.Array, epoch: int, num_train: int, steps: int, batch_size: int):
    """The batches' example indices (steps, B) and the step keys (steps,) of one epoch, from
    the run's key and the epoch number alone: a resumed run repeats them."""
    epoch_key = jax.random.fold_in(key, epoch)
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_train)
    indices = order[:steps * batch_size].reshape(steps, batch_size)
    return indices, jax.random.split(jax.random.fold_in(epoch_key, 1), steps)
