"""Train with Flax + Optax: `python -m flax_impl.train` (see --help).

`train` builds the run on a 1-D `data` mesh of all devices, every process's: the state and the
dataset replicated, each device gathering and computing its rows of every batch, XLA joining them.
`train_loop` runs the epochs: jitted chunks of train steps, an evaluation, an Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl import core
from flax_impl.common import errors
from flax_impl.common import workdir as workdirs
from flax_impl.common.config import STEPS_PER_CALL, Config, build_parser, config_from_args
from flax_impl.common.data import load_mnist
from flax_impl.common.report import epoch_bar, printing, quiet_library_logs, record_epoch, summary_line
from flax_impl.common.signals import SignalWatch, stop_requests
from flax_impl.extras import distributed
from flax_impl.extras.compile_cache import use_compilation_cache
from flax_impl.extras.kernels import Kernels, get_kernels

CHECKPOINT_DIR = workdirs.CHECKPOINT_DIR


def create_port(config: Config, total_steps: int, kernels: Kernels) -> core.Port:
    """`config`'s network, optimizer and train step in its API, with `kernels`' operations."""
    tx = core.create_optimizer(config, total_steps)
    if config.api == "nnx":  # flax.nnx loads only when asked for (it is slow to import)
        from flax_impl import nnx_train

        return nnx_train.create_port(config, tx, kernels)
    return core.create_port(config, tx, kernels)


@dataclasses.dataclass
class Progress:
    """Where training stands, saved with each checkpoint: the epoch and step to continue from,
    that epoch's loss so far, the records of the finished epochs, and whose run it is (the
    config's `workdirs.run_identity`)."""

    epoch: int = 1
    step: int = 0
    loss_sum: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)
    run: str = ""


def checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    """Orbax's manager of `workdir/checkpoints`, named by global step, the latest two kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager | None, step: int, state: Any,
                    progress: Progress) -> None:
    """Save `state` and `progress` as global step `step` (nothing without a workdir)."""
    if manager is None:
        return
    workdirs.check_free_space(manager.directory, sum(x.nbytes for x in jax.tree.leaves(state)))
    with errors.checkpoint_io(manager.directory / str(step), saving=True):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(dataclasses.asdict(progress))))
        manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, target: Any, identity: str
                       ) -> tuple[int, Any, Progress] | None:
    """The latest (global step, state, progress), the state restored like `target` (arrays or
    their shapes, with shardings); None without a checkpoint. WorkdirError if it is damaged or
    another config's than `identity` (`workdirs.run_identity`), which its progress record,
    read first, tells before any array is read."""
    for saved in manager.all_steps():  # Orbax would follow a link, and fail to delete it later
        if (folder := Path(manager.directory) / str(saved)).is_symlink():
            raise errors.WorkdirError(f"{folder} is a symbolic link, not this run's own "
                                      f"checkpoint: remove it, or train afresh (the trainers' "
                                      f"--overwrite)")
    step = manager.latest_step()
    if step is None:
        return None
    where = f"checkpoint {manager.directory / str(step)}"
    progress = restore_items(manager, step, progress=ocp.args.JsonRestore()).progress
    progress = Progress(**workdirs.checked_progress(progress, where))
    workdirs.check_identity(progress.run, identity, where)
    state = restore_items(manager, step, state=ocp.args.StandardRestore(target)).state
    return step, state, progress


def restore_items(manager: ocp.CheckpointManager, step: int, **items) -> Any:
    """Checkpoint `step`'s `items` (Orbax restore arguments by name); WorkdirError if damaged."""
    with errors.checkpoint_io(manager.directory / str(step), saving=False):
        return manager.restore(step, args=ocp.args.Composite(**items))


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, steps_per_call: int = STEPS_PER_CALL,
          devices: list | None = None, kernels: str | Kernels = "auto") -> list[dict]:
    """Train `config` on `devices` (default: all, every process's) with `kernels`; print the
    seed-style log and return the per-epoch metrics. With a workdir, see `train_loop`."""
    if resume and not workdir:
        raise errors.ConfigError("--resume continues the run in --workdir: give --workdir")
    primary = distributed.is_primary()
    with printing(primary), workdirs.workdir_lock(workdir, primary) if workdir else nullcontext():
        if workdir:  # a refused workdir is said before the data loads (this only reads)
            workdirs.check_workdir(workdir, config, "flax", resume, overwrite)
        data = load_mnist(config.data_source)
        count = config.training_images(len(data.train_images))
        steps = config.steps_per_epoch(count)
        mesh = Mesh(np.array(devices or jax.devices()), ("data",))
        config.check_devices(mesh.size)
        replicated, batches = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        port = create_port(config, config.epochs * steps, get_kernels(kernels))
        init_key, train_key = jax.random.split(jax.random.key(config.seed))
        state = jax.jit(port.init, out_shardings=replicated)(init_key)
        train_data = jax.device_put((data.train_images[:count], data.train_labels[:count]),
                                    replicated)
        eval_data = jax.device_put(config.evaluation_set(data), replicated)
        if workdir:  # the flags and the data are good: only now is an earlier run replaced
            workdirs.prepare_workdir(workdir, config, "flax", resume, overwrite, primary,
                                     lambda: distributed.barrier("workdir"))
        print(f"Flax{' (NNX)' if config.api == 'nnx' else ''} on {mesh.size} "
              f"{jax.default_backend()} device(s){distributed.describe(' in {count} processes') or ''}"
              f", {get_kernels(kernels).name} kernels, {steps_per_call} step(s) per jitted call")
        train_chunk = core.make_train_chunk(port.train_step, batches)
        evaluate = core.make_evaluate(port.log_probs, config.eval_batch_size, batches)
        plan = jax.jit(functools.partial(core.epoch_plan, train_key, num_train=count, steps=steps,
                                         batch_size=config.batch_size),
                       out_shardings=(NamedSharding(mesh, P(None, "data")), replicated))
        with checkpoint_manager(workdir) if workdir else nullcontext() as manager:
            history = train_loop(config, state, train_chunk, evaluate, plan, train_data,
                                 eval_data, steps, steps_per_call, manager, resume,
                                 files=workdir if primary else None)
        print(summary_line(history))
    return history


def train_loop(config: Config, state, train_chunk: Callable, evaluate: Callable, plan: Callable,
               train_data, eval_data, steps: int, steps_per_call: int,
               manager: ocp.CheckpointManager | None, resume: bool, files: Path | None
               ) -> list[dict]:
    """Train from `state` (from the latest checkpoint if `resume`) to the last epoch; return the
    per-epoch metrics. An epoch runs `train_chunk` over the `steps` batches of its `plan`,
    `steps_per_call` at a time, then `evaluate`s, saves a checkpoint with `manager` and writes
    metrics.jsonl and curves.png into `files`. A first SIGINT/SIGTERM saves a checkpoint at the
    next chunk and stops (TrainingStopped); an exploded loss (`errors.exploded`) stops at once."""
    progress = Progress(run=workdirs.run_identity(config))
    if resume:
        state, progress = resume_point(manager, state, progress, config, steps)
    first_loss = None  # the first step's loss: what an exploded loss is measured against
    with stop_requests() as stop, workdirs.EpochFiles(files) as epoch_files:
        if progress.history:  # the checkpoint's records: metrics.jsonl as they were, whole
            epoch_files.write(progress.history)
        for epoch in range(progress.epoch, config.epochs + 1):
            first = progress.step if epoch == progress.epoch else 0
            (indices, keys), started = plan(epoch), time.perf_counter()
            with epoch_bar(epoch, config.epochs, steps, first, disable=not distributed.is_primary()) as bar:
                for start in range(first, steps, steps_per_call):
                    # All processes agree (a collective) to stop at the same chunk.
                    if (signum := distributed.any_signal(stop.signal)) is not None:
                        save_checkpoint(manager, (epoch - 1) * steps + start, state, progress)
                        raise stopped(signum, manager, progress)
                    end = min(start + steps_per_call, steps)
                    state, metrics = train_chunk(state, *train_data, indices[start:end],
                                                 keys[start:end])
                    loss = float(metrics["loss"].sum())  # the only host sync of a chunk
                    first_loss = float(metrics["loss"][0]) if first_loss is None else first_loss
                    if errors.exploded(loss / (end - start), first_loss):
                        raise errors.diverged(loss / (end - start), epoch, f"{start + 1}-{end}")
                    progress = dataclasses.replace(progress, epoch=epoch, step=end,
                                                   loss_sum=progress.loss_sum + loss)
                    bar.update(end - start)
                    bar.set_postfix_str(f"loss={progress.loss_sum / end:.4f}")
            loss_sum, correct = evaluate(state, *eval_data)
            record_epoch(progress.history, epoch, progress.loss_sum / steps,
                         float(loss_sum) / len(eval_data[1]), int(correct), len(eval_data[1]),
                         time.perf_counter() - started, config.eval_split)
            progress = dataclasses.replace(progress, epoch=epoch + 1, step=0, loss_sum=0.0)
            save_checkpoint(manager, epoch * steps, state, progress)
            epoch_files.write(progress.history)
            if (signum := distributed.any_signal(stop.signal)) is not None:  # (in evaluation)
                raise stopped(signum, manager, progress)
    return progress.history


def resume_point(manager: ocp.CheckpointManager, state, fresh: Progress, config: Config,
                 steps: int) -> tuple[Any, Progress]:
    """The state (restored like `state`) and progress of the latest checkpoint, if this run's
    config (`fresh.run`) trained it; without one, `state` and `fresh`."""
    if (restored := restore_checkpoint(manager, state, fresh.run)) is None:
        print(f"--resume: no checkpoint in {manager.directory}; starting afresh")
        return state, fresh
    done, state, progress = restored
    total = config.epochs * steps
    if done > total or done != (progress.epoch - 1) * steps + progress.step:
        raise errors.WorkdirError(f"--resume: the checkpoint in {manager.directory} is at step "
                                  f"{done}, which does not fit this run of {total} steps "
                                  f"({steps} per epoch); --overwrite to start afresh")
    print(f"Resumed from {manager.directory}: epoch {progress.epoch}, step "
          f"{progress.step}/{steps}")
    return state, progress


def stopped(signum: int, manager, progress: Progress) -> Exception:
    """The TrainingStopped of signal `signum` (the one any process got), once saved."""
    name = signal.Signals(signum).name
    at = f"at epoch {progress.epoch}, step {progress.step}" if progress.step else \
        f"after epoch {progress.epoch - 1}"
    where = f"saved a checkpoint {at}; continue with --resume" if manager else "nothing saved"
    return errors.TrainingStopped(f"{name}: stopped; {where}", together=True,
                                  exit_code=128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m flax_impl.train", __doc__.splitlines()[0], "flax")
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    use_compilation_cache()
    quiet_library_logs()

    def body():
        config = config_from_args(args)
        with errors.peers_watched(distributed.start(args)), distributed.stops_together():
            distributed.check_same_flags(config, args)
            train(config, args.workdir, args.resume, args.overwrite, args.steps_per_call,
                  kernels=args.kernels)

    kept = "; the last checkpoint is kept: continue with --resume" if args.workdir else ""
    with SignalWatch(kept):
        return distributed.leave(errors.run_command(body))


if __name__ == "__main__":
    sys.exit(main())
