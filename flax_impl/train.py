"""Train with Flax + Optax under jit: `python -m flax_impl.train` (see --help).

The recipe (flax_impl/config.py) in functional style: a `TrainState` pytree, a pure
`train_step(state, batch, key) -> (state, metrics)` that augments, differentiates and updates, and
a jitted `lax.scan` over chunks of steps (faster than a Python loop of jitted steps on XLA:CPU; see
the README). The dataset is uploaded to the devices once; each epoch is a random permutation split
into full batches. Data-parallel over all local devices: each batch is split along a `data` mesh
axis, parameters are replicated; one device is simply a mesh of one.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl.augment import random_rotate
from flax_impl.config import Config, ConfigError, build_parser, config_from_args
from flax_impl.data import DataError, load_mnist, normalize
from flax_impl.model import create_model
from flax_impl.reporting import (
    CONFIG_FILE,
    WorkdirError,
    epoch_bar,
    prepare_workdir,
    summary_line,
    test_line,
    write_metrics,
)

CHECKPOINT_DIR = "checkpoints"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: a pytree."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def onecycle_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """torch's OneCycleLR(anneal_strategy="cos", cycle_momentum=False), step for step.

    Cosine warm-up from lr/div_factor to lr until step warmup_fraction*total_steps - 1, then cosine
    decay to lr/div_factor/final_div_factor at step total_steps - 1 (torch's phase boundaries,
    which differ by one step from `optax.cosine_onecycle_schedule`'s).
    """
    initial = config.lr / config.div_factor
    final = initial / config.final_div_factor
    warmup_end = config.warmup_fraction * total_steps - 1
    decay_steps = total_steps - 1 - warmup_end

    def anneal(start, stop, remaining):  # start when remaining = 1, stop when it is 0
        # torch's stop + (start - stop) / 2 * (cos(pi f) + 1) with f = 1 - remaining, written as
        # sin(pi remaining / 2)^2 so that float32 keeps its relative precision where the rate
        # is tiny (the last steps).
        return stop + (start - stop) * jnp.square(jnp.sin(jnp.pi / 2 * remaining))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warming = anneal(initial, config.lr, (warmup_end - step) / warmup_end)
        decaying = anneal(config.lr, final, (total_steps - 1 - step) / decay_steps)
        return jnp.where(step <= warmup_end, warming, decaying)

    return schedule


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """torch's SGD(nesterov=True, weight_decay=wd): L2 decay added to the gradient, then SGD."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(onecycle_schedule(config, total_steps), config.momentum, nesterov=True),
    )


def create_train_state(key: jax.Array, model, tx: optax.GradientTransformation) -> TrainState:
    """Initial parameters (torch's default initialisation), BatchNorm statistics, optimizer state."""
    variables = model.init(key, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def variables_of(state: TrainState) -> dict:
    """The model variables ({"params", "batch_stats"}) of a train state."""
    if state.batch_stats:
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def nll_loss(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean negative log-likelihood (torch's F.nll_loss)."""
    return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1).mean()


def to_inputs(images: jax.Array) -> jax.Array:
    """uint8 (B, 28, 28) -> normalised float32 (B, 28, 28, 1)."""
    return normalize(images[..., None].astype(jnp.float32) / 255.0)


def make_train_step(model, tx: optax.GradientTransformation, config: Config):
    """The pure train step of `config`: (state, (images, labels), key) -> (state, metrics)."""

    def train_step(state: TrainState, batch, key: jax.Array):
        images, labels = batch
        rotate_key, dropout_key = jax.random.split(key)
        pixels = images[..., None].astype(jnp.float32) / 255.0
        inputs = normalize(random_rotate(pixels, config.max_rotation, rotate_key))

        def loss_fn(params):
            log_probs, updates = model.apply(
                variables_of(state.replace(params=params)), inputs, train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            return nll_loss(log_probs, labels), updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
        return state, {"loss": loss}

    return train_step


def make_train_chunk(train_step, batch_sharding: NamedSharding):
    """Jitted: run `train_step` over rows of `indices` (K, B) with `keys` (K,) in one `lax.scan`."""

    def train_chunk(state, images, labels, indices, keys):
        def body(state, step_input):
            index, key = step_input
            batch = jax.lax.with_sharding_constraint((images[index], labels[index]),
                                                     batch_sharding)
            return train_step(state, batch, key)

        return jax.lax.scan(body, state, (indices, keys))

    return jax.jit(train_chunk, donate_argnums=0)


def make_evaluate(model, batch_size: int, batch_sharding: NamedSharding):
    """Jitted: (variables, uint8 images, labels) -> (summed NLL loss, number correct)."""

    @jax.jit
    def evaluate(variables, images, labels):
        count = images.shape[0]
        padded = math.ceil(count / batch_size) * batch_size
        mask = jnp.arange(padded) < count
        images = jnp.pad(images, ((0, padded - count), (0, 0), (0, 0)))
        labels = jnp.pad(labels, (0, padded - count))

        def batch_totals(batch):
            images, labels, mask = jax.lax.with_sharding_constraint(batch, batch_sharding)
            log_probs = model.apply(variables, to_inputs(images), train=False)
            losses = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), 1)[:, 0]
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


def chunks(steps: int, steps_per_call: int) -> list[tuple[int, int]]:
    """(start, stop) step ranges of at most `steps_per_call` steps covering `steps`."""
    return [(start, min(start + steps_per_call, steps))
            for start in range(0, steps, steps_per_call)]


def default_steps_per_call() -> int:
    """Steps per jitted call: a scan of many on CPU (measured faster), one per call elsewhere."""
    return 39 if jax.default_backend() == "cpu" else 1


def checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    """Orbax manager of the per-epoch checkpoints in `workdir/checkpoints` (latest two kept)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def build(config: Config, steps: int):
    """The model, optimizer and initial state of `config` for `steps` steps per epoch."""
    model = create_model(config.model, config.dropout)
    tx = create_optimizer(config, config.epochs * steps)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    return model, tx, create_train_state(init_key, model, tx), train_key


def restore_variables(workdir: str | Path) -> dict:
    """The variables ({"params", "batch_stats"}) of the latest checkpoint in a training workdir."""
    workdir = Path(workdir)
    record = json.loads((workdir / CONFIG_FILE).read_text())
    config = Config(**{k: v for k, v in record.items() if k in Config.__dataclass_fields__})
    _, _, state, _ = build(config, steps=1)
    with checkpoint_manager(workdir) as manager:
        if manager.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    return variables_of(state)


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, steps_per_call: int | None = None,
          devices: list | None = None) -> list[dict]:
    """Train `config` on `devices` (default: all local ones); print the seed-style log; return the
    per-epoch metrics."""
    history = prepare_workdir(workdir, config, "flax", resume, overwrite) if workdir else []
    data = load_mnist(config.data_source)
    count = config.train_examples or len(data.train_images)
    steps = config.steps_per_epoch(count)
    if steps == 0:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {count} "
                          f"training images")
    mesh = Mesh(np.array(devices or jax.devices()), ("data",))
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ConfigError(f"--batch-size {config.batch_size} and the eval batch size must "
                          f"divide evenly over {mesh.size} devices")
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    model, tx, state, train_key = build(config, steps)
    state = jax.device_put(state, replicated)
    train_images, train_labels, test_images, test_labels = jax.device_put(
        (data.train_images[:count], data.train_labels[:count], data.test_images,
         data.test_labels), replicated)
    train_chunk = make_train_chunk(make_train_step(model, tx, config), batch_sharding)
    evaluate = make_evaluate(model, config.eval_batch_size, batch_sharding)
    manager = checkpoint_manager(workdir) if workdir else None
    if resume and manager and manager.latest_step() is not None:
        done = manager.latest_step()
        state = manager.restore(done, args=ocp.args.StandardRestore(state))
        history = history[:done]
        print(f"Resumed from {workdir / CHECKPOINT_DIR} after epoch {done}")

    steps_per_call = steps_per_call or default_steps_per_call()
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        indices, keys = epoch_plan(train_key, epoch, count, steps, config.batch_size)
        loss_sum = 0.0
        with epoch_bar(epoch, config.epochs, steps) as bar:
            for first, stop in chunks(steps, steps_per_call):
                state, metrics = train_chunk(state, train_images, train_labels,
                                             indices[first:stop], keys[first:stop])
                loss_sum += float(metrics["loss"].sum())  # the only host sync: for the bar
                bar.update(stop - first)
                bar.set_postfix_str(f"loss={loss_sum / stop:.4f}")
        loss_total, correct = evaluate(variables_of(state), test_images, test_labels)
        test_loss, correct = float(loss_total) / len(test_images), int(correct)
        print(test_line(test_loss, correct, len(test_images)), flush=True)
        history.append({"epoch": epoch, "train_loss": loss_sum / steps, "test_loss": test_loss,
                        "test_accuracy": correct / len(test_images),
                        "seconds": time.perf_counter() - start})
        if manager:
            manager.save(epoch, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
            write_metrics(workdir, history)
    if manager:
        manager.close()
    print(summary_line(history))
    return history


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m flax_impl.train", __doc__.splitlines()[0])
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="train steps per jitted call (a lax.scan); default: 39 on CPU, 1 "
                             "elsewhere")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        if args.steps_per_call is not None and args.steps_per_call <= 0:
            raise ConfigError(f"--steps-per-call must be > 0, got {args.steps_per_call}")
        train(config, args.workdir, args.resume, args.overwrite, args.steps_per_call)
    except (ConfigError, DataError, WorkdirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

