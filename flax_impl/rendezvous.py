"""Waiting for a multi-process run's coordinator; shared by both training commands.

Imports neither jax nor torch. Both frameworks' own clients abort with a fatal log and a stack
trace (jax) or log stack traces while they retry (torch) when the coordinator cannot be reached;
waiting here first turns that case into one line.
"""

from __future__ import annotations

import socket
import time


def wait_for_coordinator(host: str, port: int, timeout: float) -> str | None:
    """Wait until `host`:`port` accepts TCP connections: None once it does, else (after
    `timeout` seconds) the last error, in one line."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=5):
                return None
        except OSError as error:
            if time.monotonic() > deadline:
                return str(error)
        time.sleep(0.5)
