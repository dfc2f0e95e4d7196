"""Ctrl-C and SIGTERM during training: a request to stop at the next chunk, with a checkpoint.

Imports neither jax nor torch.
"""

from __future__ import annotations

import signal
import threading


class StopRequests:
    """Turns SIGINT/SIGTERM into a request to stop at the next chunk boundary (while active):
    `signal` is the first one's number. A second signal acts as usual (KeyboardInterrupt, or
    termination)."""

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
