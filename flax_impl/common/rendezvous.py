"""What both training commands share to start a multi-process run: the timeout, the error, and
waiting for the coordinator.

Imports neither jax nor torch. Both frameworks' own clients abort with a fatal log and a stack
trace (jax) or log stack traces while they retry (torch) when the coordinator cannot be reached;
waiting here first turns that case into one line.
"""

from __future__ import annotations

import socket
import time

from flax_impl.common.errors import ConfigError

DEFAULT_TIMEOUT = 120  # seconds to wait for all processes to join (and, in jax, a silent one)


class DistributedError(ConfigError):
    """The processes could not start together (one line: what is wrong and what to check)."""


def check_resolvable(host: str, flag: str) -> None:
    """ConfigError (exit 2) unless `host` (given with `flag`) has an address."""
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except OSError as error:
        raise ConfigError(f"{flag}: cannot resolve host {host!r} ({error}); give a host name "
                          f"or address every process can reach") from None


def claim_coordinator_port(port: int) -> None:
    """Claim `port` on this host for this process, until it exits: DistributedError if another
    process 0 has it. jax's coordinator (gRPC) binds its TCP port with SO_REUSEPORT, so two
    processes given --process-id 0 would both start one and race for the others; the UDP port
    of the same number, bound without sharing, lets only one of them start."""
    claim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        claim.bind(("", port))
    except OSError as error:
        claim.close()
        raise DistributedError(f"--process-id 0: port {port} is taken on this host ({error}): "
                               f"another process 0 of this run, or another program, holds it; "
                               f"give each process its own --process-id, or another "
                               f"--coordinator-address port") from None
    claim.detach()  # the descriptor stays open, and the port claimed, until the process exits


def wait_for_coordinator(host: str, port: int, timeout: float, name: str, fix: str) -> None:
    """Wait until `host`:`port` (where `name` listens) accepts TCP connections; after `timeout`
    seconds, DistributedError with its last error and `fix` (what to correct)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=5):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(f"cannot reach {name} at {host}:{port} within {timeout} s "
                                       f"({error}); start {name} there, or fix {fix}") from None
        time.sleep(0.5)
