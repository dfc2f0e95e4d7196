"""Train the PyTorch reference: `python -m torch_ref.train` (see --help).

`create_run` builds the run on one device (CPU or CUDA), as one process or, under torchrun, as one
rank of several (`torch_ref.distributed`: each rank computing its rows of every batch, DDP joining
the gradients). `train_loop` runs the epochs: train steps, an evaluation, a checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flax_impl.common import errors
from flax_impl.common import workdir as workdirs
from flax_impl.common.atomic import atomic_write
from flax_impl.common.config import Config, build_parser, check_same_flags, config_from_args, flags_record
from flax_impl.common.data import Mnist, load_mnist
from flax_impl.common.report import (
    epoch_bar,
    printing,
    quiet_library_logs,
    record_epoch,
    summary_line,
)
from flax_impl.common.signals import SignalWatch
from torch_ref import core, distributed
from torch_ref.distributed import SINGLE, Group
from torch_ref.model import create_model

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
BAR_EVERY = 20  # steps between progress-bar loss updates (each one a host sync)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device `device` ("auto": CUDA where torch sees a GPU, else the CPU) names."""
    if device not in DEVICES:
        raise errors.ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise errors.ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@dataclasses.dataclass
class Run:
    """One run, built by `create_run`: what `train_loop` trains, checkpoints and scores."""

    model: torch.nn.Module  # what is scored and saved
    train_model: torch.nn.Module  # what a train step calls: `model`, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Epoch orders and rotation angles, drawn on the CPU whatever the device, so that a run
    # draws the same ones everywhere; dropout uses torch's global generator of the device.
    generator: torch.Generator
    device: torch.device
    group: Group  # this process's rank among the run's processes
    steps_per_epoch: int
    train_data: tuple[torch.Tensor, torch.Tensor]  # uint8 images, int64 labels, on `device`
    eval_data: tuple[torch.Tensor, torch.Tensor]  # the test set, or the validation split
    identity: str  # the config's `workdirs.run_identity`: whose checkpoints these are


def create_run(config: Config, data: Mnist, device: str = "auto", group: Group = SINGLE) -> Run:
    """`config`'s run on `device`, as rank `group.rank` of `group.world_size` processes (joined
    by `distributed.join_from_env`); seeds torch's global generators (dropout) and the run's
    own."""
    count = config.training_images(len(data.train_images))
    steps = config.steps_per_epoch(count)
    if config.batch_size % group.world_size:
        raise errors.ConfigError(f"--batch-size {config.batch_size} must divide evenly over the "
                                 f"{group.world_size} processes")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = resolve_device(device)
    model = create_model(config.model, config.dropout, config.widths).to(device)
    train_model = distributed.distribute(model, group, device)
    if group.rank:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(config.seed + 7919 * group.rank)
    optimizer, scheduler = core.create_optimizer(model, config, config.epochs * steps)

    def on_device(images, labels):
        return torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)

    return Run(model, train_model, optimizer, scheduler, generator, device, group, steps,
               train_data=on_device(data.train_images[:count], data.train_labels[:count]),
               eval_data=on_device(*config.evaluation_set(data)),
               identity=workdirs.run_identity(config))


def atomic_save(obj, path: Path) -> None:
    """`torch.save` through a temporary file and a rename: never a half-written file."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(path: Path, run: Run, history: list[dict]) -> None:
    """Everything a resumed run needs after an epoch: weights, optimizer, schedule, generators
    (dropout's of every rank). Every rank calls it; rank 0 writes."""
    torch_rngs = run.group.gather(torch.get_rng_state())
    cuda_rngs = run.group.gather(torch.cuda.get_rng_state(run.device)
                                 if run.device.type == "cuda" else None)
    if not run.group.primary:
        return
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "generator": run.generator.get_state(),
                 "torch_rng": torch_rngs[0], "history": history, "run": run.identity,
                 **({"torch_rngs": torch_rngs} if run.group.world_size > 1 else {}),
                 **({"cuda_rng": cuda_rngs[0]} if run.device.type == "cuda" else {}),
                 **({"cuda_rngs": cuda_rngs}
                    if run.device.type == "cuda" and run.group.world_size > 1 else {})}, path)


def rank_state(state: dict, name: str, rank: int) -> torch.Tensor | None:
    """A generator state of `rank` saved as `name` (all ranks' under `name + "s"`)."""
    per_rank = state.get(name + "s") or [state.get(name)]
    return per_rank[rank] if rank < len(per_rank) else None


def restore_checkpoint(path: Path, run: Run) -> tuple[list[dict], str | None] | None:
    """Load `path` into `run` (None if there is none); the finished epochs' records and the
    identity of the run that saved it.

    `weights_only=True`: a checkpoint from elsewhere cannot run code.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        history = workdirs.checked_history(state["history"], f"checkpoint {path}")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.generator.set_state(state["generator"])
        # Dropout draws from the global generators; a rank the run did not have keeps its own.
        if (torch_rng := rank_state(state, "torch_rng", run.group.rank)) is not None:
            torch.set_rng_state(torch_rng)
        if run.device.type == "cuda":
            if (cuda_rng := rank_state(state, "cuda_rng", run.group.rank)) is not None:
                torch.cuda.set_rng_state(cuda_rng, run.device)
    except errors.WorkdirError:
        raise
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        raise errors.WorkdirError(f"checkpoint {path} is corrupt or not this run's "
                                  f"({errors.first_line(error)}); delete it or --overwrite") from None
    return history, state.get("run")


def restore_state_dict(workdir: str | Path) -> dict:
    """The model weights of a training workdir: its final model.pt, else its latest checkpoint's."""
    final, checkpoint = Path(workdir) / MODEL_FILE, Path(workdir) / CHECKPOINT_FILE
    if not final.exists() and not checkpoint.exists():
        raise errors.WorkdirError(f"no {MODEL_FILE} or {CHECKPOINT_FILE} in {workdir}")
    path = final if final.exists() else checkpoint
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved if path == final else saved["model"]
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        raise errors.WorkdirError(f"{path} is corrupt or not a torch_ref.train file "
                                  f"({errors.first_line(error)})") from None


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", group: Group = SINGLE) -> list[dict]:
    """Train `config` on `device`, as rank `group.rank` of `group.world_size` processes; print
    the seed-style log and return the per-epoch metrics. With a workdir, see `train_loop`; the
    final weights go to model.pt. In a multi-process run, rank 0 alone prints and writes the
    workdir's files."""
    with printing(group.primary), workdirs.workdir_lock(workdir, group.primary) if workdir \
            else nullcontext():
        if workdir:  # a refused workdir is said before the data loads (this only reads)
            workdirs.check_workdir(workdir, config, "torch", resume, overwrite)
        run = create_run(config, load_mnist(config.data_source), device, group)
        if workdir:  # the flags and the data are good: only now is an earlier run replaced
            workdirs.prepare_workdir(workdir, config, "torch", resume, overwrite, group.primary,
                                     group.barrier)
        ranks = f" x {group.world_size} processes" if group.world_size > 1 else ""
        print(f"PyTorch on {run.device}{ranks}")
        history = train_loop(config, run, workdir / CHECKPOINT_FILE if workdir else None, resume,
                             files=workdir if group.primary else None)
        if workdir and group.primary:
            atomic_save(run.model.state_dict(), workdir / MODEL_FILE)
        print(summary_line(history))
    return history


def train_loop(config: Config, run: Run, checkpoint: Path | None, resume: bool,
               files: Path | None) -> list[dict]:
    """Train `run` (from the `checkpoint` file if `resume`) to the last epoch; return the
    per-epoch metrics. An epoch runs `core.train_step` over the batches of its plan, this rank's
    rows of each, then scores the model, saves the `checkpoint` (every rank takes part) and
    writes metrics.jsonl and curves.png into `files`. A NaN/inf loss raises TrainingStopped, the
    last checkpoint kept."""
    steps, group = run.steps_per_epoch, run.group
    history = resume_point(checkpoint, run, config.epochs) if resume else []
    images, labels = run.train_data
    rows = group.rows(config.batch_size)
    first_loss = None  # the first step's loss: what an exploded loss is measured against
    with workdirs.EpochFiles(files) as epoch_files:
        if history:  # the checkpoint's records: metrics.jsonl as they were, whole
            epoch_files.write(history)
        for epoch in range(len(history) + 1, config.epochs + 1):
            plan = core.epoch_plan(run.generator, len(images), steps, config.batch_size)
            batches, started = plan.to(run.device), time.perf_counter()
            loss_sum = torch.zeros((), device=run.device)
            with epoch_bar(epoch, config.epochs, steps, disable=not group.primary) as bar:
                for step in range(steps):
                    batch = batches[step, rows]
                    loss_sum += core.train_step(run.train_model, run.optimizer, run.scheduler,
                                                images[batch], labels[batch], config,
                                                run.generator, (group.rank, group.world_size))
                    bar.update()
                    if step % BAR_EVERY == 0 or step == steps - 1:  # a host sync, a collective
                        mean_loss = group.sum([loss_sum.item()])[0] / group.world_size / (step + 1)
                        first_loss = mean_loss if first_loss is None else first_loss
                        if errors.exploded(mean_loss, first_loss):
                            raise errors.diverged(mean_loss, epoch, f"1-{step + 1}")
                        bar.set_postfix_str(f"loss={mean_loss:.4f}")
            record_epoch(history, epoch, mean_loss, *score(run, config.eval_batch_size),
                         len(run.eval_data[1]), time.perf_counter() - started, config.eval_split)
            if checkpoint:
                save_checkpoint(checkpoint, run, history)
            epoch_files.write(history)
    return history


def score(run: Run, batch_size: int) -> tuple[float, int]:
    """Mean loss and number of correct predictions of `run.model` on `run.eval_data`; each rank
    scores its share (a collective in a multi-process run)."""
    images, labels = run.eval_data
    if run.group.world_size == 1:
        return core.evaluate(run.model, images, labels, batch_size)
    rows = run.group.rows(len(images))
    loss, correct = core.evaluate(run.model, images[rows], labels[rows], batch_size)
    loss_sum, correct = run.group.sum([loss * len(images[rows]), correct])
    return loss_sum / len(images), int(correct)


def resume_point(checkpoint: Path | None, run: Run, epochs: int) -> list[dict]:
    """The finished epochs' records of `checkpoint` (loaded into `run`); without one, []."""
    restored = restore_checkpoint(checkpoint, run) if checkpoint else None
    if restored is None:
        print(f"--resume: no checkpoint at {checkpoint}; starting a fresh run")
        return []
    history, identity = restored
    if len(history) > epochs:
        raise errors.WorkdirError(f"--resume: {checkpoint} has {len(history)} finished epochs, "
                                  f"more than this run's {epochs}; --overwrite to start afresh")
    workdirs.check_identity(identity, run.identity, f"--resume: {checkpoint}")
    print(f"Resumed from {checkpoint} after epoch {len(history)}")
    return history


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m torch_ref.train", __doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: CUDA where torch sees a GPU, else the CPU")
    parser.add_argument("--distributed-timeout", type=int, default=distributed.DEFAULT_TIMEOUT,
                        metavar="SECONDS",
                        help="under torchrun: how long to wait for all ranks to join, and for "
                             "each collective")
    args = parser.parse_args(argv)
    quiet_library_logs()
    group = SINGLE

    def body():
        nonlocal group
        config = config_from_args(args)
        if args.distributed_timeout <= 0:
            raise errors.ConfigError(f"--distributed-timeout must be > 0, got "
                                     f"{args.distributed_timeout}")
        group = distributed.join_from_env(resolve_device(args.device), args.distributed_timeout)
        with errors.peers_watched(group.name):
            check_same_flags(group.gather(flags_record(config, args)))
            train(config, args.workdir, args.resume, args.overwrite, args.device, group)

    kept = "; the last epoch's checkpoint is kept: continue with --resume" if args.workdir else ""
    with SignalWatch(kept):
        return distributed.leave(errors.run_command(body))


if __name__ == "__main__":
    sys.exit(main())
