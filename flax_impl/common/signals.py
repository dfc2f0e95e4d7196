"""Ctrl-C and SIGTERM: one line on stderr and exit status 128 + N, at once or at the next chunk.

Python runs a signal handler only between bytecodes: a signal that arrives while a jitted
computation runs (or a C call, or a gc callback that swallows KeyboardInterrupt) would wait for
it, or be lost. So the handlers installed here do nothing themselves; the signal's number reaches
a watcher thread through `signal.set_wakeup_fd` the moment it arrives, and the thread acts:

- by default (start-up, evaluation, predict): one line on stderr, then exit 128 + N at once;
- inside `stop_requests()` (a training loop that checkpoints): the first signal only sets
  `.signal`, for the loop to save a checkpoint and stop at the next chunk; a second one acts at
  once, as by default.

Exiting at once skips the interpreter's clean-up: what was saved stays as it was (Orbax and the
workdir files are written whole or not at all). Imports neither jax nor torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_at_once_on_signals(what_is_kept: str = "") -> None:
    """Until a `SignalWatch` takes over: SIGINT/SIGTERM print one line and exit 128 + N (for a
    command's imports, which take seconds; Python's own handler would print a traceback)."""

    def handle(signum, frame):
        print(f"{signal.Signals(signum).name}: stopped{what_is_kept}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, handle)


class SignalWatch:
    """SIGINT/SIGTERM watched from a thread while active (see the module docstring).

    `what_is_kept` ends the line printed when a signal stops the process at once (e.g. "; the
    last checkpoint is kept: continue with --resume"). Only the main thread can watch; elsewhere
    this does nothing.
    """

    active: SignalWatch | None = None  # the one installed, if any

    def __init__(self, what_is_kept: str = ""):
        self.what_is_kept = what_is_kept
        self.signal: int | None = None  # the first signal while stop_first
        self.stop_first = False
        self._restore: tuple | None = None

    def _watch(self, read_fd: int) -> None:
        while data := os.read(read_fd, 1):
            signum = data[0]
            if signum not in SIGNALS:
                continue
            if self.stop_first and self.signal is None:
                self.signal = signum
                continue
            print(f"{signal.Signals(signum).name}: stopped at once{self.what_is_kept}",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        os.close(read_fd)

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is not threading.main_thread() or SignalWatch.active:
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in SIGNALS}
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                         name="signal-watch").start()
        self._restore = (previous_fd, previous, write_fd)
        SignalWatch.active = self
        return self

    def __exit__(self, *exc) -> None:
        if self._restore is None:
            return
        previous_fd, previous, write_fd = self._restore
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)  # the watcher's read ends: it stops
        SignalWatch.active, self._restore = None, None


@contextlib.contextmanager
def stop_requests(what_is_kept: str = "") -> Iterator[SignalWatch]:
    """While a training loop runs: the first SIGINT/SIGTERM sets `.signal` of the watch yielded
    (the loop saves a checkpoint and stops at its next chunk); a second acts at once. Uses the
    command's `SignalWatch` if one is active, else watches for the duration."""
    with contextlib.nullcontext(SignalWatch.active) if SignalWatch.active else \
            SignalWatch(what_is_kept) as watch:
        watch.signal, watch.stop_first = None, True
        try:
            yield watch
        finally:
            watch.stop_first = False
