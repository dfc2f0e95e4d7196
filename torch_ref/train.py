"""Train the PyTorch reference: `python -m torch_ref.train` (see --help).

The run layer around `torch_ref.core` (set up by `torch_ref.setup`), mirroring
`flax_impl.train`: one loop over steps with periodic actions (progress bar, evaluation,
checkpoint), the workdir and the command line.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch

from flax_impl.atomic import atomic_write
from flax_impl.config import Config, build_parser, config_from_args
from flax_impl.data import load_mnist
from flax_impl.reporting import (
    WorkdirError,
    diverged,
    epoch_bar,
    first_line,
    prepare_workdir,
    record_epoch,
    run_command,
    summary_line,
    write_epoch_files,
)
from torch_ref.setup import DEVICES, Setup, setup_training

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
BAR_EVERY = 20  # steps between progress-bar loss updates (each one a host sync)


def atomic_save(obj, path: Path) -> None:
    """`torch.save` through a temporary file and a rename: never a half-written file."""
    atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(path: Path, run: Setup, history: list[dict]) -> None:
    """Everything a resumed run needs after an epoch: weights, optimizer, schedule, generators."""
    atomic_save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
                 "scheduler": run.scheduler.state_dict(), "generator": run.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "history": history,
                 **({"cuda_rng": torch.cuda.get_rng_state(run.device)}
                    if run.device.type == "cuda" else {})}, path)


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
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        if run.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], run.device)
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
    print(f"Resumed from {path} after epoch {len(history)}")
    return history


def train(config: Config, workdir: Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto") -> list[dict]:
    """Train `config` on `device`; print the seed-style log; return the per-epoch metrics.

    With a workdir, a checkpoint is saved after every epoch and the final weights in model.pt;
    `resume` continues after the last finished epoch. A NaN/inf loss raises TrainingStopped.
    """
    if workdir:
        prepare_workdir(workdir, config, "torch", resume, overwrite, CHECKPOINT_FILE)
    run = setup_training(config, load_mnist(config.data_source), device)
    print(f"PyTorch on {run.device}")
    steps, checkpoint = run.steps_per_epoch, workdir / CHECKPOINT_FILE if workdir else None
    history = resume_point(run, checkpoint) if resume else []
    bar = None
    try:
        for global_step in range(len(history) * steps, config.epochs * steps):
            epoch, step = global_step // steps + 1, global_step % steps
            if step == 0:  # an epoch starts
                order, started = run.plan(), time.perf_counter()
                loss_sum = torch.zeros((), device=run.device)
                bar = epoch_bar(epoch, config.epochs, steps)
            loss_sum += run.run_step(order, step)
            bar.update()
            if step % BAR_EVERY == 0 or step == steps - 1:  # a host sync
                if not math.isfinite(loss_sum.item()):
                    raise diverged(loss_sum.item(), epoch, f"1-{step + 1}")
                bar.set_postfix_str(f"loss={loss_sum.item() / (step + 1):.4f}")
            if step == steps - 1:  # the epoch is done: evaluate, record, checkpoint
                bar = bar.close()  # None
                record_epoch(history, epoch, loss_sum.item() / steps, *run.score(),
                             len(run.eval_data[1]), time.perf_counter() - started,
                             config.eval_split)
                if checkpoint:
                    save_checkpoint(checkpoint, run, history)
                write_epoch_files(workdir, history)
    finally:
        if bar is not None:
            bar.close()
    if workdir:
        atomic_save(run.scored_model.state_dict(), workdir / MODEL_FILE)
    print(summary_line(history))
    return history


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = build_parser("python -m torch_ref.train", __doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: CUDA where torch sees a GPU, else the CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(lambda: train(config_from_args(args), args.workdir, args.resume,
                                     args.overwrite, args.device))


if __name__ == "__main__":
    sys.exit(main())
