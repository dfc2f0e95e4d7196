"""The errors every command reports in one line, and their exit codes.

Imports neither jax nor torch. `run_command` turns them into a message on stderr and an exit
status: 2 for bad flags, data or workdirs; 3 for a diverged run; 4 for a lost process of a
multi-process run; 128 + N for signal N.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

BAD_INPUT_EXIT = 2
DIVERGED_EXIT = 3
LOST_PEER_EXIT = 4


class ConfigError(ValueError):
    """A bad flag value, described in one line."""


class DataError(RuntimeError):
    """A problem with the data, described in one line that says how to fix it."""


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked, described in one line."""


class TrainingStopped(RuntimeError):
    """Training stopped early (divergence or a signal), described in one line. `together`: every
    process of a multi-process run stops at the same step (a signal's stop they agreed on, a
    loss they share)."""

    def __init__(self, message: str, exit_code: int, together: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.together = together


def damaged_checkpoint(path, error: BaseException) -> WorkdirError:
    """The one-line error for a checkpoint that cannot be read. The reader's abandoned work
    (Orbax's reads completing on a closed event loop) prints tracebacks from other threads for a
    moment, and from the garbage collector: as the command ends with this error, that work is let
    finish with stderr silenced, and the hooks that would print it later are too."""
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        time.sleep(0.5)
        gc.collect()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    if any(words in str(error) for words in ("not compatible with the stored shape",
                                             "tree structures do not match")):
        return WorkdirError(f"checkpoint {path} is not one of this run's: its arrays have other "
                            f"shapes or names ({first_line(error)}); train afresh (the trainers' "
                            f"--overwrite)")
    return WorkdirError(f"checkpoint {path} is corrupt or partial ({first_line(error)}); "
                        f"delete it to use the previous one, or train afresh (the trainers' "
                        f"--overwrite)")


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


# A training loss this many times the run's first step's (and at least this many times ln 10, an
# untrained classifier's) has exploded: the run is stopped as if it were NaN.
EXPLODED_FACTOR = 100


def exploded(loss: float, reference: float) -> bool:
    """Whether a mean training loss has diverged: not finite, or EXPLODED_FACTOR times
    `reference` (the run's first step's loss, at least an untrained classifier's)."""
    return not math.isfinite(loss) or loss > EXPLODED_FACTOR * max(reference, math.log(10))


def diverged(loss: float, epoch: int, steps: str) -> TrainingStopped:
    """The error for a training loss that is NaN/inf or has exploded (exit status 3)."""
    return TrainingStopped(f"the training loss became {loss:.4g} in epoch {epoch} (steps "
                           f"{steps}); stopped, the last good checkpoint is kept; try a lower "
                           f"--lr", exit_code=DIVERGED_EXIT, together=True)


def run_command(body: Callable[[], object]) -> int:
    """Run a command's body; its one-line errors become a message on stderr and an exit status.

    Bad flags, data or workdirs, and a full disk: 2. TrainingStopped: its own status (3 for a
    diverged loss, 4 for a lost process of a multi-process run, 128 + the signal's number for
    SIGINT/SIGTERM); Ctrl-C elsewhere: 130.
    """
    try:
        body()
    except (ConfigError, DataError, WorkdirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except TrainingStopped as stopped:
        # A signal's stop is no error: it saved a checkpoint to resume from.
        print(str(stopped) if stopped.exit_code >= 128 else f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C where training saves nothing itself (start-up, torch)
        print("SIGINT: stopped; what was saved is kept (a workdir's last checkpoint); continue "
              "with --resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as error:
        if disk_full(error):
            print(f"error: the disk is full ({first_line(error)}); the last complete checkpoint "
                  f"is kept: free some space, then --resume", file=sys.stderr)
        elif (refused := unwritable(error)) is not None:
            print(f"error: {refused}: {error.strerror}; choose a directory you can write to "
                  f"(or make it writable)", file=sys.stderr)
        else:
            raise
        return BAD_INPUT_EXIT
    return 0


def unwritable(error: BaseException) -> str | None:
    """The path of a file the command could not create or write (permissions, a read-only or
    immutable directory, a file where a directory was expected), or None."""
    if isinstance(error, OSError) and error.filename is not None and error.errno in (
            errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR):
        return str(error.filename)
    return None


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a write that found no space left on the device."""
    for _ in range(10):  # the error and what caused it, a few levels down
        if error is None:
            return False
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
