"""Train the PyTorch reference: `python -m torch_ref.train` (see --help).

The run layer around `torch_ref.core` (set up by `torch_ref.setup`), mirroring
`flax_impl.train`: a loop over epochs and, in each, over steps (progress bar, evaluation,
checkpoint), the workdir and the command line; on one process or, under torchrun, several
(`torch_ref.distributed`).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from flax_impl.common.atomic import atomic_write
from flax_impl.common.config import Config, build_parser, config_from_args
from flax_impl.common.data import load_mnist
from flax_impl.common.errors import (
    ConfigError,
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
    prepare_workdir,
    workdir_lock,
)
from torch_ref import distributed
from torch_ref.setup import DEVICES, Setup, resolve_device, setup_training

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
BAR_EVERY = 20  # steps between progress-bar loss updates (each one a host sync)


def atomic_save(obj, path: Path) -> None:
    """`torch.save` through a temporary file and a rename: never a half-written file."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(path: Path, run: Setup, history: list[dict]) -> None:
    """Everything a resumed run needs after an epoch: weights, optimizer, schedule, generators
    (dropout's of every rank). Every rank calls it; rank 0 writes."""
    torch_rngs = run.group.gather(torch.get_rng_state())
    cuda_rngs = run.group.gather(torch.cuda.get_rng_state(run.device)
                                 if run.device.type == "cuda" else None)
    if not run.group.primary:
        return
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
                 "scheduler": run.scheduler.state_dict(), "generator": run.generator.get_state(),
                 "torch_rng": torch_rngs[0], "history": history,
                 **({"torch_rngs": torch_rngs} if run.group.world_size > 1 else {}),
                 **({"cuda_rng": cuda_rngs[0]} if run.device.type == "cuda" else {}),
                 **({"cuda_rngs": cuda_rngs}
                    if run.device.type == "cuda" and run.group.world_size > 1 else {})}, path)


def rank_state(state: dict, name: str, rank: int) -> torch.Tensor | None:
    """A generator state of `rank` saved as `name` (all ranks' under `name + "s"`)."""
    per_rank = state.get(name + "s") or [state.get(name)]
    return per_rank[rank] if rank < len(per_rank) else None


def restore_checkpoint(path: Path, run: Setup) -> list[dict] | None:
    """Load `path` into `run` (None if there is none); the finished epochs' records.

    `weights_only=True`: a checkpoint from elsewhere cannot run code.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
        run.generator.set_state(state["generator"])
        # Dropout draws from the global generators; a rank the run did not have keeps its own.
        if (torch_rng := rank_state(state, "torch_rng", run.group.rank)) is not None:
            torch.set_rng_state(torch_rng)
        if run.device.type == "cuda":
            if (cuda_rng := rank_state(state, "cuda_rng", run.group.rank)) is not None:
                torch.cuda.set_rng_state(cuda_rng, run.device)
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        raise WorkdirError(f"checkpoint {path} is corrupt or not this run's "
                           f"({first_line(error)}); delete it or --overwrite") from None
    return state["history"]


def restore_state_dict(workdir: str | Path) -> dict:
    """The model weights of a training workdir: its final model.pt, else its latest checkpoint's."""
    final, checkpoint = Path(workdir) / MODEL_FILE, Path(workdir) / CHECKPOINT_FILE
    if not final.exists() and not checkpoint.exists():
        raise WorkdirError(f"no {MODEL_FILE} or {CHECKPOINT_FILE} in {workdir}")
    path = final if final.exists() else checkpoint
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if path == final:
            return saved
        if "ema" in saved:  # the scored weights: AveragedModel's, under "module."
            return {k.removeprefix("module."): v for k, v in saved["ema"].items()
                    if k.startswith("module.")}
        return saved["model"]
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        raise WorkdirError(f"{path} is corrupt or not a torch_ref.train file "
                           f"({first_line(error)})") from None


def resume_point(run: Setup, path: Path | None) -> list[dict]:
    """The finished epochs' records of the checkpoint at `path` (loaded into `run`), or []."""
    history = restore_checkpoint(path, run) if path else None
    if history is None:
        print(f"--resume: no checkpoint at {path}; starting a fresh run")
        return []
    if len(history) > run.config.epochs:
        raise WorkdirError(f"--resume: {path} has {len(history)} finished epochs, more than "
                           f"this run's {run.config.epochs}; --overwrite to start afresh")
    print(f"Resumed from {path} after epoch {len(history)}")
    return history


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto",
          group: distributed.Group = distributed.SINGLE) -> list[dict]:
    """Train `config` on `device`, as rank `group.rank` of `group.world_size` processes; print
    the seed-style log; return the per-epoch metrics.

    With a workdir, a checkpoint is saved after every epoch and the final weights in model.pt;
    `resume` continues after the last finished epoch. A NaN/inf loss raises TrainingStopped.
    In a multi-process run, rank 0 alone prints and writes the workdir's files.
    """
    with printing(group.primary), workdir_lock(workdir, group.primary) if workdir else \
            nullcontext():
        if workdir:  # a refused workdir is said before the data loads (this only reads)
            check_workdir(workdir, config, "torch", resume, overwrite)
        run = setup_training(config, load_mnist(config.data_source), device, group)
        if workdir:  # the flags and the data are good: only now is an earlier run replaced
            prepare_workdir(workdir, config, "torch", resume, overwrite, group.primary,
                            group.barrier)
        ranks = f" x {group.world_size} processes" if group.world_size > 1 else ""
        print(f"PyTorch on {run.device}{ranks}")
        history = train_loop(run, workdir, resume)
        if workdir and group.primary:
            atomic_save(run.scored_model.state_dict(), workdir / MODEL_FILE)
        print(summary_line(history))
    return history


def train_loop(run: Setup, workdir: Path | None, resume: bool) -> list[dict]:
    """Run `run` to its last epoch (after the checkpoint in `workdir` if `resume`); the
    per-epoch metrics."""
    config, steps, group = run.config, run.steps_per_epoch, run.group
    checkpoint = workdir / CHECKPOINT_FILE if workdir else None
    history = resume_point(run, checkpoint) if resume else []
    first_loss = None  # the first step's loss: what an exploded loss is measured against
    with EpochFiles(workdir if group.primary else None) as epoch_files:
        if history:  # the checkpoint's records: metrics.jsonl as they were, whole
            epoch_files.write(history)
        for epoch in range(len(history) + 1, config.epochs + 1):
            order, started = run.plan(), time.perf_counter()
            loss_sum = torch.zeros((), device=run.device)
            with epoch_bar(epoch, config.epochs, steps, disable=not group.primary) as bar:
                for step in range(steps):
                    loss_sum += run.run_step(order, step)
                    bar.update()
                    # a host sync (and a collective)
                    if step % BAR_EVERY == 0 or step == steps - 1:
                        mean_loss = group.sum([loss_sum.item()])[0] / group.world_size / (step + 1)
                        first_loss = mean_loss if first_loss is None else first_loss
                        if exploded(mean_loss, first_loss):
                            raise diverged(mean_loss, epoch, f"1-{step + 1}")
                        bar.set_postfix_str(f"loss={mean_loss:.4f}")
            # The epoch is done: evaluate, record, checkpoint.
            record_epoch(history, epoch, mean_loss, *run.score(), len(run.eval_data[1]),
                         time.perf_counter() - started, config.eval_split)
            if checkpoint:
                save_checkpoint(checkpoint, run, history)
            epoch_files.write(history)
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    group = distributed.SINGLE

    def body():
        nonlocal group
        config = config_from_args(args)
        if args.distributed_timeout <= 0:
            raise ConfigError(f"--distributed-timeout must be > 0, got "
                              f"{args.distributed_timeout}")
        group = distributed.join_from_env(resolve_device(args.device), args.distributed_timeout)
        with peers_watched(group.name):
            train(config, args.workdir, args.resume, args.overwrite, args.device, group)

    return distributed.leave(run_command(body))


if __name__ == "__main__":
    sys.exit(main())
