"""Training on several processes with `jax.distributed`: the flags, start-up and failures.

Every process runs `python -m flax_impl.train` with the same flags plus its own
`--process-id` (or lets jax.distributed detect them on SLURM, a TPU pod, Open MPI). After
`initialize`, `jax.devices()` lists all processes' devices and the run's mesh spans them
(`flax_impl.train`): each process computes its own rows of every batch, the collectives (gloo
on CPU) join them. Process 0 alone prints and writes the workdir; Orbax saves and restores the
checkpoints with all processes taking part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from flax_impl.common import config
from flax_impl.common.errors import (
    LOST_PEER_EXIT,
    ConfigError,
    TrainingStopped,
    exit_at_once,
    first_line,
)
from flax_impl.common.rendezvous import (
    DEFAULT_TIMEOUT,
    DistributedError,
    check_resolvable,
    claim_coordinator_port,
    wait_for_coordinator,
)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process run; all None and not `detect`: a single process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detect: bool = False  # let jax.distributed find the rest in the environment (SLURM, TPU, MPI)
    timeout: int = DEFAULT_TIMEOUT

    @property
    def requested(self) -> bool:
        """Whether this process is to join a multi-process run."""
        return self.detect or any(value is not None for value in (
            self.coordinator_address, self.num_processes, self.process_id))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of `python -m flax_impl.train`."""
    group = parser.add_argument_group(
        "multi-process (jax.distributed)",
        "start one process per host with the same flags and its own --process-id; the workdir "
        "must be on a filesystem all of them share")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, where the others join it")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run, with what the flags above leave out "
                            "detected from the cluster (SLURM, a Cloud TPU pod, Open MPI)")
    group.add_argument("--distributed-timeout", type=int, default=DEFAULT_TIMEOUT,
                       metavar="SECONDS",
                       help="how long to wait for all processes to join, and for a silent one "
                            "before the others stop")


def cluster_from_args(args: argparse.Namespace) -> Cluster:
    """The validated Cluster the parsed flags describe."""
    cluster = Cluster(args.coordinator_address, args.num_processes, args.process_id,
                      args.distributed, args.distributed_timeout)
    if cluster.timeout <= 0:
        raise ConfigError(f"--distributed-timeout must be > 0, got {cluster.timeout}")
    if cluster.num_processes is not None and cluster.num_processes <= 0:
        raise ConfigError(f"--num-processes must be > 0, got {cluster.num_processes}")
    if cluster.process_id is not None and not (
            0 <= cluster.process_id < (cluster.num_processes or sys.maxsize)):
        raise ConfigError(f"--process-id must be in 0..{(cluster.num_processes or 0) - 1} "
                          f"(--num-processes {cluster.num_processes}), got {cluster.process_id}")
    address = cluster.coordinator_address
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator-address must be HOST:PORT, got {address!r}")
    return cluster


def initialize(cluster: Cluster) -> None:
    """Join the multi-process run `cluster` asks for (nothing for a single process).

    Blocks until all processes have joined; DistributedError after `cluster.timeout` seconds.
    """
    if not cluster.requested:
        return
    if cluster.coordinator_address:
        host, _, port = cluster.coordinator_address.rpartition(":")
        check_resolvable(host, "--coordinator-address")
        if cluster.process_id == 0:  # it starts the coordinator, on a port of its own
            claim_coordinator_port(int(port))
        elif cluster.process_id:  # the others wait for it
            wait_for_coordinator(host, int(port), cluster.timeout, "the coordinator",
                                 "--coordinator-address")
    # jax aborts the process (a fatal log, a stack) when the processes do not all join in time
    # (one never started, two took the same --process-id): this watchdog says so in one line
    # first, and jax's own limit is set later than it.
    watchdog = threading.Timer(cluster.timeout, not_joined, args=(cluster.timeout,))
    watchdog.daemon = True
    watchdog.start()
    # XLA's preemption notifier would take SIGTERM from the handlers of flax_impl.common.signals
    # (installed before this): a SIGTERM would no longer stop the run at a checkpoint. (jax
    # before 0.8.2 has no such option: there the notifier cannot be turned off.)
    if "jax_enable_preemption_service" in jax.config.values:
        jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            cluster.coordinator_address, cluster.num_processes, cluster.process_id,
            initialization_timeout=cluster.timeout + 30,
            heartbeat_timeout_seconds=cluster.timeout)
    except Exception as error:  # jax raises ValueError, RuntimeError or its own for these
        if cluster.coordinator_address is None and "coordinator_address" in str(error):
            raise DistributedError(
                "--distributed: found no cluster to join (SLURM, a Cloud TPU pod, Open MPI); "
                "give --coordinator-address, --num-processes and --process-id") from None
        raise DistributedError(
            f"jax.distributed.initialize failed ({first_line(error)}); check that every "
            f"process runs with the same --coordinator-address and --num-processes, a "
            f"distinct --process-id, and that process 0 is reachable") from None
    finally:
        watchdog.cancel()


def not_joined(timeout: float) -> None:
    """The watchdog's action: one line, exit status 4 at once."""
    print(f"error: the processes did not all join within {timeout} s (--distributed-timeout): "
          f"start every one, each with its own --process-id, with the same "
          f"--coordinator-address and --num-processes", file=sys.stderr, flush=True)
    exit_at_once(LOST_PEER_EXIT)


def start(args: argparse.Namespace) -> str | None:
    """Join the multi-process run the flags of `add_flags` ask for (nothing for a single
    process); this process's name in the run ("process 0 of 2"), None for a single one."""
    initialize(cluster_from_args(args))
    check_backend()
    return describe()


def check_backend() -> None:
    """Start JAX's devices (every JAX command does first); ConfigError (one line) if none can
    start, as where JAX_PLATFORMS names one this machine lacks (`cuda` without a GPU)."""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:  # jax 0.10 asserts when none can start
        asked = os.environ.get("JAX_PLATFORMS", "")
        raise ConfigError(f"JAX cannot start a device (JAX_PLATFORMS={asked!r}: "
                          f"{first_line(error) or type(error).__name__}); unset JAX_PLATFORMS, "
                          f"or install jax for that device (e.g. jax[cuda12])") from None


def check_same_flags(run_config: config.Config, args: argparse.Namespace) -> None:
    """ConfigError (in every process) unless all processes run the same config with the same
    flags, --process-id aside: a collective."""
    if jax.process_count() == 1:
        return
    record = config.flags_record(run_config, args, own=("process_id",))
    text = json.dumps(record, sort_keys=True).encode()
    size = int(np.max(multihost_utils.process_allgather(np.int32(len(text)))))
    padded = np.frombuffer(text.ljust(size, b" "), np.uint8)
    gathered = multihost_utils.process_allgather(padded)
    config.check_same_flags([json.loads(bytes(row).decode()) for row in gathered])


def is_primary() -> bool:
    """Whether this process prints and writes the workdir (process 0)."""
    return jax.process_index() == 0


def any_signal(signum: int | None) -> int | None:
    """The signal a process of the run got (the highest number if several), the same on every
    process (a collective: all processes call it); None if none got one."""
    if jax.process_count() == 1:
        return signum
    return int(np.max(multihost_utils.process_allgather(np.int32(signum or 0)))) or None


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def describe(template: str = "process {index} of {count}") -> str | None:
    """This process in a multi-process run, `template` filled in ("process 0 of 2"); None for a
    single process."""
    if jax.process_count() == 1:
        return None
    return template.format(index=jax.process_index(), count=jax.process_count())


@contextlib.contextmanager
def stops_together():
    """Around a run's training: a stop every process takes at the same step (TrainingStopped
    with `together`: a signal's, a diverged loss) leaves jax.distributed together, a barrier of
    all processes and then process 0's coordinator stops. Exiting at once instead, as after a
    failure (`leave`), process 0 could take the coordinator away from a process still
    finishing, and jax would abort that one."""
    try:
        yield
    except TrainingStopped as stop:
        if stop.together and jax.distributed.is_initialized():
            with contextlib.suppress(Exception):  # then `leave` exits at once
                jax.distributed.shutdown()
        raise


def leave(exit_code: int) -> int:
    """Return `exit_code`; a failed multi-process run still joined (see `stops_together`) exits
    at once instead, since jax's exit hook would wait for the other processes (which may be
    dead) and then abort noisily."""
    if exit_code and jax.distributed.is_initialized():
        exit_at_once(exit_code)
    return exit_code
