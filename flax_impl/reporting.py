"""The bookkeeping both training commands share: log lines, epoch records, workdir files, exits.

Imports neither jax nor torch, so `flax_impl.train` and `torch_ref.train` share it; their loops
differ only in framework code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from flax_impl.atomic import atomic_write
from flax_impl.config import Config, ConfigError
from flax_impl.data import DataError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SPLIT_NAMES = {"test": "test", "val": "validation"}  # a metric's prefix -> its set's name


def eval_split(record: dict) -> str:
    """"val" or "test": which set an epoch record was scored on."""
    return "val" if "val_accuracy" in record else "test"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked, described in one line."""


class TrainingStopped(RuntimeError):
    """Training stopped early (divergence or a signal), described in one line."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def diverged(loss: float, epoch: int, steps: str) -> TrainingStopped:
    """The error for a NaN/inf training loss (exit status 3)."""
    return TrainingStopped(f"the training loss became {loss} in epoch {epoch} (steps {steps}); "
                           f"stopped, the last good checkpoint is kept; try a lower --lr",
                           exit_code=3)


def run_command(body: Callable[[], object]) -> int:
    """Run a command's body; its one-line errors become a message on stderr and an exit status.

    Bad flags, data or workdirs: 2. TrainingStopped: its own status (3 for a NaN loss, 4 for a
    lost process of a multi-process run, 128 + the signal's number for SIGINT/SIGTERM).
    """
    try:
        body()
    except (ConfigError, DataError, WorkdirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        # A signal's stop is no error: it saved a checkpoint to resume from.
        print(str(stopped) if stopped.exit_code >= 128 else f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


LOST_PEER_EXIT = 4


@contextlib.contextmanager
def peers_watched(who: str | None):
    """In a multi-process run (`who`: this process, e.g. "rank 0 of 2"; None for a single one),
    a failed collective, i.e. another process died or stopped, becomes a one-line
    TrainingStopped (exit status 4) instead of a traceback."""
    try:
        yield
    except (ConfigError, DataError, WorkdirError, TrainingStopped):
        raise
    except (RuntimeError, ValueError) as error:  # what jax and torch raise when one fails
        if who is None:
            raise
        raise TrainingStopped(
            f"{who}: a collective failed ({first_line(error)}); another process has died or "
            f"stopped, so this one stops too; restart all of them with --resume",
            exit_code=LOST_PEER_EXIT) from None


def exit_at_once(exit_code: int) -> None:
    """Flush and end the process with `exit_code`, skipping exit hooks: after a failure in a
    multi-process run, the frameworks' hooks would wait for peers that may be dead."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def epoch_bar(epoch: int, epochs: int, steps: int, done: int = 0, disable: bool = False) -> tqdm:
    """The per-epoch progress bar, starting at `done` steps; `set_postfix_str` the running loss.

    `disable`: a bar that shows nothing (the processes of a multi-process run but the first)."""
    return tqdm(total=steps, initial=done, desc=f"Epoch {epoch}/{epochs}", unit="step",
                leave=True, dynamic_ncols=True, mininterval=0.5, disable=disable)


def evaluation_line(loss: float, correct: int, total: int, split: str = "test") -> str:
    """The seed notebook's line: 'Test set: Average loss: 0.0165, Accuracy: 9945/10000 (99.45%)'
    ('Validation set: ...' for the validation split)."""
    return (f"{SPLIT_NAMES[split].capitalize()} set: Average loss: {loss:.4f}, "
            f"Accuracy: {correct}/{total} ({100.0 * correct / total:.2f}%)")


def summary_line(history: list[dict]) -> str:
    """One line summing up a finished run."""
    if not history:
        return "Done: no epoch to run"
    split = eval_split(history[-1])
    key = f"{split}_accuracy"
    last, best = history[-1], max(history, key=lambda m: m[key])
    minutes = sum(m["seconds"] for m in history) / 60
    return (f"Done: {len(history)} epochs in {minutes:.1f} min; final {SPLIT_NAMES[split]} "
            f"accuracy {100 * last[key]:.2f}% (best {100 * best[key]:.2f}% at epoch {best['epoch']})")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: never a half-written file."""
    atomic_write(path, lambda file: file.write(text.encode()))


def record_epoch(history: list[dict], epoch: int, train_loss: float, eval_loss: float,
                 correct: int, total: int, seconds: float, split: str = "test") -> None:
    """Print the seed's test-set line (or the validation split's) and append the epoch's record
    to `history`: epoch, train_loss, {split}_loss, {split}_accuracy, seconds."""
    print(evaluation_line(eval_loss, correct, total, split), flush=True)
    history.append({"epoch": epoch, "train_loss": train_loss, f"{split}_loss": eval_loss,
                    f"{split}_accuracy": correct / total, "seconds": seconds})


def write_epoch_files(workdir: Path | None, history: list[dict]) -> None:
    """Rewrite `workdir`'s metrics.jsonl and curves.png from `history` (nothing without one)."""
    if workdir:
        write_metrics(workdir, history)
        write_curves(workdir, history)


def prepare_workdir(workdir: Path, config: Config, framework: str, resume: bool,
                    overwrite: bool, checkpoint: str, primary: bool = True,
                    barrier: Callable[[], None] = lambda: None) -> None:
    """`check_workdir`, then `create_workdir` for a fresh run.

    In a multi-process run every process checks and the `primary` one alone creates; `barrier`
    (wait for all processes) keeps it from changing the workdir while another still reads it.
    """
    fresh = check_workdir(workdir, config, framework, resume, overwrite)
    barrier()
    if fresh and primary:
        create_workdir(workdir, config, framework, checkpoint)
    barrier()


@contextlib.contextmanager
def printing(enabled: bool):
    """Print as usual inside, or (`enabled` false: the processes of a multi-process run but
    the first) print nothing to stdout."""
    if enabled:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def config_record(config: Config, framework: str) -> dict:
    """What a workdir's config.json holds: the Config's fields and "framework"."""
    return {"framework": framework, **json.loads(config.to_json())}


def check_workdir(workdir: Path, config: Config, framework: str, resume: bool,
                  overwrite: bool) -> bool:
    """Whether `workdir` is to be created afresh for `config` (True) or holds its run to resume.

    A workdir holding another run is refused unless `resume` (same config only) or `overwrite`.
    Reads only: in a multi-process run every process checks, then one creates.
    """
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; name a directory")
    config_path = workdir / CONFIG_FILE
    if not config_path.exists() or overwrite:
        return True
    try:
        existing = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise WorkdirError(f"{config_path} is not valid JSON; use --overwrite") from None
    if not resume:
        raise WorkdirError(
            f"{workdir} already holds a run; pass --resume to continue it or --overwrite "
            f"to replace it"
        )
    record = config_record(config, framework)
    if existing != record:
        changed = sorted(k for k in record.keys() | existing.keys()
                         if record.get(k) != existing.get(k))
        raise WorkdirError(
            f"--resume: {workdir} holds a run with a different config ({', '.join(changed)}); "
            f"use the same flags or --overwrite"
        )
    return False


def create_workdir(workdir: Path, config: Config, framework: str, checkpoint: str) -> None:
    """Create `workdir` for a fresh run of `config`: config.json, and no metrics or checkpoint
    (`workdir/checkpoint`, a file or directory) of an earlier run."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / METRICS_FILE).unlink(missing_ok=True)
    stale = workdir / checkpoint
    if stale.is_dir():
        shutil.rmtree(stale)
    else:
        stale.unlink(missing_ok=True)
    atomic_write_text(workdir / CONFIG_FILE,
                      json.dumps(config_record(config, framework), indent=2, sort_keys=True) + "\n")


def workdir_record(workdir: str | Path) -> dict:
    """A training workdir's config.json: the Config's fields and "framework" ("flax"/"torch")."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(f"{workdir} is not a training workdir (no {CONFIG_FILE}); train "
                           f"with --workdir first")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("framework") not in ("flax", "torch"):
        raise WorkdirError(f"{path} is not a training config; train with --workdir again")
    return record


def load_config(workdir: str | Path) -> Config:
    """The Config recorded in a training workdir's config.json."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in workdir_record(workdir).items() if k in fields})


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of a metrics.jsonl (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl with `history` (atomically, so it always matches a checkpoint)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write_text(workdir / METRICS_FILE, text)


def write_curves(workdir: Path, history: list[dict]) -> Path:
    """Plot train and test (or validation) loss and accuracy per epoch into `workdir/curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs, split = [m["epoch"] for m in history], eval_split(history[-1])
    name = SPLIT_NAMES[split]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    loss_axis.plot(epochs, [m[f"{split}_loss"] for m in history], "o-", label=name)
    loss_axis.set(xlabel="epoch", ylabel="NLL loss", yscale="log", title="Loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [100 * m[f"{split}_accuracy"] for m in history], "o-", color="C2")
    accuracy_axis.axhline(99.4, color="grey", linestyle="--", label="99.4 % target")
    accuracy_axis.set(xlabel="epoch", ylabel=f"{name} accuracy (%)",
                      title=f"{name.capitalize()} accuracy")
    accuracy_axis.legend()
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    path = workdir / "curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
