"""The errors every command reports in one line, and their exit codes.

Imports neither jax nor torch. `run_command` turns them into a message on stderr and an exit
status: 2 for bad flags, data or workdirs; 3 for a diverged run; 4 for a lost process of a
multi-process run; 128 + N for signal N.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import signal
import sys
import threading
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


class _Held(logging.Filter):
    """A handler's filter that keeps back every record (`records`), or drops it (`drop`)."""

    def __init__(self):
        super().__init__()
        self.records, self.drop = [], False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.drop:
            self.records.append(record)
        return False


@contextlib.contextmanager
def checkpoint_io(path, saving: bool):
    """Around Orbax's save (`saving`) or restore of checkpoint `path`: a failure becomes one
    WorkdirError. Orbax works in threads of its own; when one fails, each logs the failure with
    its traceback, and the work they abandon fails later, on a closed event loop, each printing
    a traceback (tensorstore's threads, through `sys.unraisablehook`). So the log records and
    the hooks' reports wait while Orbax works, printed if it succeeds; once it has failed, they
    are dropped, then and later: the command's line is its last word."""
    held = [(handler, _Held()) for handler in logging.getLogger().handlers]
    for handler, hold in held:
        handler.addFilter(hold)
    hooks = [(sys, "unraisablehook"), (sys, "excepthook"), (threading, "excepthook")]
    originals, waiting = [getattr(*hook) for hook in hooks], []
    for (module, name), original in zip(hooks, originals, strict=True):
        setattr(module, name, functools.partial(_hold_call, waiting, original))
    try:
        yield
    except Exception as error:  # orbax/tensorstore raise many kinds
        for _, hold in held:
            hold.drop = True
        waiting.append(None)  # (from now on, _hold_call drops)
        sys.unraisablehook = lambda unraisable: None  # and the collector's, of abandoned reads
        raise failed_checkpoint(path, error, saving) from None
    for (module, name), original in zip(hooks, originals, strict=True):
        setattr(module, name, original)
    for original, args in waiting:
        original(*args)
    for handler, hold in held:
        handler.removeFilter(hold)
        for record in hold.records:
            handler.handle(record)


def _hold_call(waiting: list, original: Callable, *args) -> None:
    """A hook's report from another thread, kept in `waiting` (dropped once it ends in None);
    the main thread's goes to `original` at once."""
    if threading.current_thread() is threading.main_thread():
        original(*args)
    elif not waiting or waiting[-1] is not None:
        waiting.append((original, args))


def failed_checkpoint(path, error: BaseException, saving: bool) -> WorkdirError:
    """The one-line error for checkpoint `path` that could not be saved or read."""
    if saving:
        cause, fix = ("the disk is full", "free some space") if disk_full(error) else \
            (first_line(error), "mend that")
        return WorkdirError(f"checkpoint {path} could not be saved ({cause}); the last complete "
                            f"checkpoint is kept: {fix}, then --resume")
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
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) \
                or "os_error_code='28'" in str(error):  # (tensorstore's words for ENOSPC)
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
