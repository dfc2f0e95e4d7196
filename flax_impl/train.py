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
import shutil
import signal
import sys
import threading
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
    write_curves,
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


def chunks(steps: int, steps_per_call: int, first: int = 0) -> list[tuple[int, int]]:
    """(start, stop) step ranges of at most `steps_per_call` steps covering `first` to `steps`."""
    return [(start, min(start + steps_per_call, steps))
            for start in range(first, steps, steps_per_call)]


def default_steps_per_call() -> int:
    """Steps per jitted call: a scan of many on CPU (measured faster), one per call elsewhere."""
    return 39 if jax.default_backend() == "cpu" else 1


class TrainingStopped(RuntimeError):
    """Training stopped early (divergence or a signal); described in one line."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    """Orbax manager of `workdir/checkpoints`, named by global step; the latest two are kept.

    Orbax writes each checkpoint to a temporary directory and renames it when complete.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, progress: dict) -> None:
    """Save `state` and where training stands (`epoch`, steps done in it, their loss sum)."""
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState
                       ) -> tuple[TrainState, dict] | None:
    """The latest (state, progress), None without a checkpoint; WorkdirError if it is damaged."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
    except Exception as error:  # orbax/tensorstore raise many kinds for damaged files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise WorkdirError(f"checkpoint {manager.directory / str(step)} is corrupt or partial "
                           f"({reason}); delete it to use the previous one, or --overwrite") from None
    return restored.state, restored.progress


def build(config: Config, steps: int):
    """The model, optimizer and initial state of `config` for `steps` steps per epoch."""
    model = create_model(config.model, config.dropout)
    tx = create_optimizer(config, config.epochs * steps)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    return model, tx, create_train_state(init_key, model, tx), train_key


def load_config(workdir: str | Path) -> Config:
    """The Config recorded in a training workdir's config.json."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{workdir} is not a training workdir (no {CONFIG_FILE}); train "
                           f"with --workdir first")
    record = json.loads(path.read_text())
    return Config(**{k: v for k, v in record.items() if k in Config.__dataclass_fields__})


def restore_variables(workdir: str | Path) -> dict:
    """The variables ({"params", "batch_stats"}) of the latest checkpoint in a training workdir."""
    config = load_config(workdir)
    _, _, state, _ = build(config, steps=1)
    with checkpoint_manager(Path(workdir)) as manager:
        restored = restore_checkpoint(manager, state)
    if restored is None:
        raise WorkdirError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    return variables_of(restored[0])


class StopRequests:
    """Turns SIGINT/SIGTERM into a request to stop at the next chunk boundary (while active).

    A second signal acts as usual (KeyboardInterrupt, or termination).
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.signal = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, steps_per_call: int | None = None,
          devices: list | None = None) -> list[dict]:
    """Train `config` on `devices` (default: all local ones); print the seed-style log; return the
    per-epoch metrics.

    With a workdir, a checkpoint is saved after every epoch and when SIGINT/SIGTERM asks to stop
    (raising TrainingStopped after saving); a NaN/inf loss raises TrainingStopped at once, leaving
    the last good checkpoint. `resume` continues from the latest checkpoint, mid-epoch included.
    """
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
    if workdir and not resume:  # a fresh run: no checkpoint of an earlier one may survive
        shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)
    manager = checkpoint_manager(workdir) if workdir else None
    progress = {"epoch": 1, "steps": 0, "loss_sum": 0.0}
    restored = restore_checkpoint(manager, state) if resume and manager else None
    if restored:
        state, progress = restored
        state = jax.device_put(state, replicated)
        if progress["steps"] == steps:  # a finished epoch
            progress = {"epoch": progress["epoch"] + 1, "steps": 0, "loss_sum": 0.0}
        history = history[:progress["epoch"] - 1]
        print(f"Resumed from {workdir / CHECKPOINT_DIR}: epoch {progress['epoch']}, "
              f"step {progress['steps']}/{steps}")

    steps_per_call = steps_per_call or default_steps_per_call()
    try:
        with StopRequests() as stop:
            for epoch in range(progress["epoch"], config.epochs + 1):
                start = time.perf_counter()
                indices, keys = epoch_plan(train_key, epoch, count, steps, config.batch_size)
                done, loss_sum = (progress["steps"], progress["loss_sum"]) if (
                    epoch == progress["epoch"]) else (0, 0.0)
                with epoch_bar(epoch, config.epochs, steps) as bar:
                    bar.update(done)
                    for first, stop_step in chunks(steps, steps_per_call, done):
                        if stop.signal is not None:
                            interrupted(stop.signal, manager, state, epoch, first, loss_sum)
                        state, metrics = train_chunk(state, train_images, train_labels,
                                                     indices[first:stop_step],
                                                     keys[first:stop_step])
                        chunk_loss = float(metrics["loss"].sum())  # the only host sync (the bar)
                        if not math.isfinite(chunk_loss):
                            raise TrainingStopped(
                                f"the training loss became {chunk_loss} in epoch {epoch} "
                                f"(steps {first + 1}-{stop_step}); stopped. Last good checkpoint: "
                                f"{manager.latest_step() if manager else None} (global step); "
                                f"try a lower --lr", exit_code=3)
                        loss_sum += chunk_loss
                        bar.update(stop_step - first)
                        bar.set_postfix_str(f"loss={loss_sum / stop_step:.4f}")
                loss_total, correct = evaluate(variables_of(state), test_images, test_labels)
                test_loss, correct = float(loss_total) / len(test_images), int(correct)
                print(test_line(test_loss, correct, len(test_images)), flush=True)
                history.append({"epoch": epoch, "train_loss": loss_sum / steps,
                                "test_loss": test_loss,
                                "test_accuracy": correct / len(test_images),
                                "seconds": time.perf_counter() - start})
                if manager:
                    save_checkpoint(manager, state, {"epoch": epoch, "steps": steps,
                                                     "loss_sum": loss_sum})
                    write_metrics(workdir, history)
                    write_curves(workdir, history)
    finally:
        if manager:
            manager.close()
    print(summary_line(history))
    return history


def interrupted(signum: int, manager, state: TrainState, epoch: int, steps_done: int,
                loss_sum: float):
    """Save a mid-epoch checkpoint (with a workdir) and raise TrainingStopped."""
    name = signal.Signals(signum).name
    if manager:
        save_checkpoint(manager, state, {"epoch": epoch, "steps": steps_done,
                                         "loss_sum": loss_sum})
        where = f"saved a checkpoint at epoch {epoch}, step {steps_done}; continue with --resume"
    else:
        where = "nothing saved (no --workdir)"
    raise TrainingStopped(f"{name}: stopped; {where}", exit_code=128 + signum)


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
    except TrainingStopped as stopped:
        print(f"error: {stopped}" if stopped.exit_code == 3 else str(stopped), file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

