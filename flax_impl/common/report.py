"""The log lines both training commands print: progress bars, evaluations, the summary.

Imports neither jax nor torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from tqdm import tqdm

SPLIT_NAMES = {"test": "test", "val": "validation"}  # a metric's prefix -> its set's name


def eval_split(record: dict) -> str:
    """"val" or "test": which set an epoch record was scored on."""
    return "val" if "val_accuracy" in record else "test"


def epoch_bar(epoch: int, epochs: int, steps: int, done: int = 0, disable: bool = False) -> tqdm:
    """The per-epoch progress bar, starting at `done` steps; `set_postfix_str` the running loss.

    `disable`: a bar that shows nothing (the processes of a multi-process run but the first);
    otherwise tqdm's own settings apply (TQDM_DISABLE=1 hides every bar)."""
    return tqdm(total=steps, initial=done, desc=f"Epoch {epoch}/{epochs}", unit="step",
                leave=True, dynamic_ncols=True, mininterval=0.5,
                **({"disable": True} if disable else {}))


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


def record_epoch(history: list[dict], epoch: int, train_loss: float, eval_loss: float,
                 correct: int, total: int, seconds: float, split: str = "test") -> None:
    """Print the seed's test-set line (or the validation split's) and append the epoch's record
    to `history`: epoch, train_loss, {split}_loss, {split}_accuracy, seconds."""
    print(evaluation_line(eval_loss, correct, total, split), flush=True)
    history.append({"epoch": epoch, "train_loss": train_loss, f"{split}_loss": eval_loss,
                    f"{split}_accuracy": correct / total, "seconds": seconds})


@contextlib.contextmanager
def printing(enabled: bool):
    """Print as usual inside, or (`enabled` false: the processes of a multi-process run but
    the first) print nothing to stdout."""
    if enabled:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever `sys.stdout` is when a record comes (`printing` may have
    silenced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stdout)
        super().emit(record)


def quiet_library_logs() -> None:
    """The commands' logging: our lines as they are, information on stdout with the rest of the
    run's report (stderr holds an error's one line); the libraries' warnings and errors only
    (absl's errors only: Orbax notes there that a read-only checkpoint is read only)."""
    information = _Stdout()
    information.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler()
    problems.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[information, problems])
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "absl" else logging.WARNING)
