"""Train with Flax + Optax: `python -m flax_impl.train` (see --help).

The run layer around the functional core (`flax_impl.core`, set up by `flax_impl.setup`): one
loop over jitted chunks of steps with periodic actions (progress bar, evaluation, checkpoint),
the workdir, Orbax checkpoints, stopping cleanly on SIGINT/SIGTERM, and the command line; on one
process or several (`flax_impl.extras.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from flax_impl import setup
from flax_impl.common.config import Config, build_parser, config_from_args
from flax_impl.common.data import load_mnist
from flax_impl.common.errors import (
    TrainingStopped,
    WorkdirError,
    diverged,
    exploded,
    first_line,
    peers_watched,
    run_command,
)
from flax_impl.common.report import epoch_bar, printing, record_epoch, summary_line
from flax_impl.common.workdir import (
    EpochFiles,
    check_workdir,
    load_config,
    prepare_workdir,
    workdir_lock,
)
from flax_impl.compile_cache import use_compilation_cache
from flax_impl.core import (
    TrainState,
    chunk_bounds,
    create_optimizer,
    eval_variables,
    train_state_shapes,
)
from flax_impl.setup import Setup, setup_training

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Progress:
    """Where training stands: the epoch and step to continue from, that epoch's loss so far, and
    the records of the finished epochs. Saved with each checkpoint."""

    epoch: int = 1
    step: int = 0
    loss_sum: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)


def checkpoint_manager(workdir: Path, read_only: bool = False) -> ocp.CheckpointManager:
    """Orbax manager of `workdir/checkpoints`, named by global step; the latest two are kept.

    Orbax writes each checkpoint to a temporary directory and renames it when complete.
    `read_only`: for reading a finished run (creates and deletes nothing).
    """
    if read_only:  # (the options that only saving uses are unset: orbax warns otherwise)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0,
                                               enable_async_checkpointing=False)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager | None, state: TrainState,
                    progress: Progress) -> None:
    """Save `state` and `progress` (nothing without a manager, i.e. without a workdir).

    A disk without room for it is a WorkdirError before Orbax starts writing (Orbax's own
    failure mid-write logs a traceback per file); the last complete checkpoint stays.
    """
    if manager is None:
        return
    needed = 2 * sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + 2**16  # with metadata
    free = shutil.disk_usage(manager.directory).free
    if free < needed:
        raise WorkdirError(f"the disk holding {manager.directory} has {free / 2**20:.1f} MiB "
                           f"free, a checkpoint needs about {needed / 2**20:.1f}; the last "
                           f"complete checkpoint is kept: free some space, then --resume")
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave(dataclasses.asdict(progress))))
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState
                       ) -> tuple[TrainState, Progress] | None:
    """The latest (state, progress), None without a checkpoint; WorkdirError if it is damaged."""
    step = manager.latest_step()
    if step is None:
        return None
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
    except Exception as error:  # orbax/tensorstore raise many kinds for damaged files
        raise WorkdirError(f"checkpoint {manager.directory / str(step)} is corrupt or partial "
                           f"({first_line(error)}); delete it to use the previous one, or "
                           f"--overwrite") from None
    return restored.state, Progress(**restored.progress)


def restore_variables(workdir: str | Path) -> dict:
    """The variables ({"params", "batch_stats"}) of the latest checkpoint in a training workdir:
    the ones it scored (the moving average of the parameters where the recipe keeps one)."""
    config = load_config(workdir)
    if not (Path(workdir) / CHECKPOINT_DIR).is_dir():
        raise WorkdirError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    model = setup.build_model(config, "stock")  # only its variables' shapes are used
    # The state's shapes alone (traced, not compiled), each restored onto the first device.
    shapes = train_state_shapes(model, create_optimizer(config, 1), ema=bool(config.ema_decay))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=device), shapes)
    with checkpoint_manager(Path(workdir), read_only=True) as manager:
        restored = restore_checkpoint(manager, target)
    if restored is None:
        raise WorkdirError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    return eval_variables(restored[0])


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


def stopped_by(signum: int, manager, state: TrainState, progress: Progress) -> TrainingStopped:
    """Save a mid-epoch checkpoint (with a workdir); the TrainingStopped to raise."""
    save_checkpoint(manager, state, progress)
    where = (f"saved a checkpoint at epoch {progress.epoch}, step {progress.step}; continue "
             f"with --resume" if manager else "nothing saved (no --workdir)")
    return TrainingStopped(f"{signal.Signals(signum).name}: stopped; {where}",
                           exit_code=128 + signum, together=True)


def resume_point(run: Setup, manager: ocp.CheckpointManager | None
                 ) -> tuple[TrainState, Progress]:
    """The state and progress to start from: the latest checkpoint's, or the initial ones."""
    restored = restore_checkpoint(manager, run.state) if manager else None
    if restored is None:
        if manager:
            print(f"--resume: no checkpoint in {manager.directory}; starting a fresh run")
        return run.state, Progress()
    state, progress = restored
    total, done = run.config.epochs * run.steps_per_epoch, int(state.step)
    if done > total or done != (progress.epoch - 1) * run.steps_per_epoch + progress.step:
        raise WorkdirError(f"--resume: the checkpoint in {manager.directory} is at step {done}, "
                           f"which does not fit this run of {total} steps "
                           f"({run.steps_per_epoch} per epoch); --overwrite to start afresh")
    print(f"Resumed from {manager.directory}: epoch {progress.epoch}, step "
          f"{progress.step}/{run.steps_per_epoch}")
    return jax.device_put(state, run.replicated), progress


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, steps_per_call: int | None = None,
          devices: list | None = None, kernels: str | setup.Kernels = "auto") -> list[dict]:
    """Train `config` on `devices` (default: all of them, every process's); print the seed-style
    log; return the per-epoch metrics.

    With a workdir, a checkpoint is saved after every epoch and when SIGINT/SIGTERM asks to stop
    (raising TrainingStopped after saving); a NaN/inf loss raises TrainingStopped at once, leaving
    the last good checkpoint. `resume` continues from the latest checkpoint, mid-epoch included.
    In a multi-process run, process 0 alone prints and writes the workdir's files.
    """
    primary = setup.is_primary()
    with printing(primary), workdir_lock(workdir, primary) if workdir else nullcontext():
        if workdir:  # a refused workdir is said before the data loads (this only reads)
            check_workdir(workdir, config, "flax", resume, overwrite)
        run = setup_training(config, load_mnist(config.data_source), devices=devices,
                             kernels=kernels, steps_per_call=steps_per_call)
        if workdir:  # the flags and the data are good: only now is an earlier run replaced
            prepare_workdir(workdir, config, "flax", resume, overwrite, primary,
                            lambda: setup.barrier("workdir"))
        processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        api = " (NNX)" if config.api == "nnx" else ""
        print(f"Flax{api} on {run.replicated.mesh.size} {jax.default_backend()} device(s){processes}, "
              f"{setup.describe_kernels(kernels)} kernels, {run.steps_per_call} step(s) per jitted call")
        manager = checkpoint_manager(workdir) if workdir else None
        try:
            history = train_loop(run, manager, resume, files=workdir if primary else None)
        finally:
            if manager:
                manager.close()
        print(summary_line(history))
    return history


def train_loop(run: Setup, manager: ocp.CheckpointManager | None, resume: bool,
               files: Path | None) -> list[dict]:
    """Run `run` to its last epoch (from the latest checkpoint if `resume`), checkpointing with
    `manager` and writing the epoch files to `files`; the per-epoch metrics."""
    config, steps = run.config, run.steps_per_epoch
    state, progress = resume_point(run, manager) if resume else (run.state, Progress())
    first_loss = None  # the first step's loss: what an exploded loss is measured against
    with StopRequests() as stop, EpochFiles(files) as epoch_files:
        if progress.history:  # the checkpoint's records: metrics.jsonl as they were, whole
            epoch_files.write(progress.history)
        for epoch in range(progress.epoch, config.epochs + 1):
            first = progress.step if epoch == progress.epoch else 0
            plan, started = run.plan(epoch), time.perf_counter()
            with epoch_bar(epoch, config.epochs, steps, first,
                           disable=not setup.is_primary()) as bar:
                for start, stop_step in chunk_bounds(steps, run.steps_per_call, first):
                    # Processes agree (a collective) so that all stop at the same chunk; one that
                    # got no signal itself reports SIGTERM.
                    if setup.any_process(stop.signal is not None):
                        raise stopped_by(stop.signal or signal.SIGTERM, manager, state, progress)
                    state, metrics = run.run_chunk(state, plan, start, stop_step)
                    chunk_loss = float(metrics["loss"].sum())  # the only host sync per chunk
                    mean_loss = chunk_loss / (stop_step - start)
                    if first_loss is None:
                        first_loss = float(metrics["loss"][0])
                    if exploded(mean_loss, first_loss):
                        raise diverged(mean_loss, epoch, f"{start + 1}-{stop_step}")
                    progress = dataclasses.replace(progress, epoch=epoch, step=stop_step,
                                                   loss_sum=progress.loss_sum + chunk_loss)
                    bar.update(stop_step - start)
                    bar.set_postfix_str(f"loss={progress.loss_sum / stop_step:.4f}")
            # The epoch is done: evaluate, record, checkpoint.
            record_epoch(progress.history, epoch, progress.loss_sum / steps, *run.score(state),
                         len(run.eval_data[1]), time.perf_counter() - started, config.eval_split)
            progress = Progress(epoch + 1, 0, 0.0, progress.history)
            save_checkpoint(manager, state, progress)
            epoch_files.write(progress.history)
    return progress.history


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m flax_impl.train", __doc__.splitlines()[0])
    setup.add_flags(parser)
    args = parser.parse_args(argv)
    use_compilation_cache()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def body():
        config = config_from_args(args)
        with peers_watched(setup.start_processes(args)), setup.stops_together():
            train(config, args.workdir, args.resume, args.overwrite, args.steps_per_call,
                  kernels=args.kernels)

    return setup.leave(run_command(body))


if __name__ == "__main__":
    sys.exit(main())
