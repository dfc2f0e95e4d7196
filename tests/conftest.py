"""Shared fixtures: small synthetic datasets in the formats the loaders read."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from flax_impl.common.data import IDX_FILES, Mnist

# Tests compile the same small programs many times (and in subprocesses): share XLA's
# persistent compilation cache between them. Set before anything imports jax.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mnist20k-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Compiling is much of the suite's time: XLA's backend optimisation level 1 compiles the train
# chunk in less time than the default level 3 and runs the suite's small programs about as
# fast. Every process of the suite compiles at the same level, so the runs it compares compile
# alike; the two tests of the product's own light compilation pin level 3 where they compare.
SUITE_OPTIMIZATION = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_OPTIMIZATION}".strip()
# The test workers (`-n 2`) and the processes they start share the cores: torch's OpenMP threads,
# one per core in each process, would wait for cores the others hold (torchrun sets the same).
# Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The suite's one Flax run shape: the tiny source's TINY_TRAIN images (`tiny_idx_source`), 8 steps of
# 64 an epoch in two jitted calls (a signal can stop a run mid-epoch), the default evaluation
# batch. The training tests that are not about the shape train with it, in or out of process,
# so the compilation cache holds their programs once.
TINY_TRAIN, TINY_TEST = 512, 200  # the tiny source's images (`tiny_idx_source`)
SHAPE_BATCH_SIZE, SHAPE_STEPS_PER_CALL = 64, 4
FLAX_SHAPE = ("--batch-size", str(SHAPE_BATCH_SIZE), "--steps-per-call", str(SHAPE_STEPS_PER_CALL))
# The schedule's length is compiled into the train program: the runs that are not about their
# length train SHAPE_EPOCHS epochs, so that one program serves them all (FLAX_RUN, TORCH_RUN).
SHAPE_EPOCHS = 3
SHAPE_STEPS = TINY_TRAIN // SHAPE_BATCH_SIZE  # steps per epoch on the tiny source
FLAX_RUN = ("--epochs", str(SHAPE_EPOCHS), *FLAX_SHAPE)
TORCH_RUN = ("--epochs", str(SHAPE_EPOCHS), "--batch-size", str(SHAPE_BATCH_SIZE))
ROOT = Path(__file__).resolve().parent.parent


def child_env(devices: int) -> dict:
    """The environment of a process with `devices` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def normal(seed: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Standard-normal test inputs drawn by NumPy (`jax.random.normal` would compile a program
    for each shape)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding `array`."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def synthetic_mnist(train: int, test: int, seed: int = 0) -> Mnist:
    """Learnable fake digits: class k is a bright bar at row 2 + 2k, plus noise."""
    rng = np.random.default_rng(seed)

    def split(count):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 40, (count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[4 + 2 * label: 6 + 2 * label, 6:22] = 255
        return images, labels

    return Mnist(*split(train), *split(test))


def write_idx_dir(directory: Path, mnist: Mnist, compress: bool = False) -> Path:
    """Write `mnist` as the four standard IDX files (gzipped if `compress`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, stem in IDX_FILES.items():
        data = idx_bytes(getattr(mnist, name))
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return directory


def crash_in_epoch(monkeypatch, train_module, epoch: int) -> None:
    """Make `train_module.train` die with KeyboardInterrupt as `epoch` starts (a crash)."""
    real_bar = train_module.epoch_bar

    def bar(current, epochs, steps, done=0, **kwargs):
        if current == epoch:
            raise KeyboardInterrupt
        return real_bar(current, epochs, steps, done, **kwargs)

    monkeypatch.setattr(train_module, "epoch_bar", bar)


@pytest.fixture(scope="session")
def tiny_idx_source(tmp_path_factory) -> str:
    """A `--data-source` value for TINY_TRAIN training and TINY_TEST test synthetic digits."""
    directory = write_idx_dir(tmp_path_factory.mktemp("tiny_idx"),
                              synthetic_mnist(TINY_TRAIN, TINY_TEST))
    return f"idx:{directory}"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own empty MNIST cache unless it asks for the real one."""
    monkeypatch.setenv("MNIST20K_CACHE", str(tmp_path / "cache"))


# --- Watching and steering a training run from a test --------------------------------------
#
# A test that stops, kills or resumes a run must know where the run stands: `TrainingHook` wraps
# the train calls of either trainer (a jitted chunk of steps in Flax, one step in torch), counts
# the steps they take and, at a call the test names, acts there (pauses until the test says go,
# signals its own process, replaces the loss). In the test's process `hook_training` installs it
# with monkeypatch; a child process started by `start_hooked` installs it from the environment.

PROGRESS_BAR = re.compile(r"Epoch \d+/\d+:[^\]\n]*\]")  # tqdm's "Epoch e/E: ...|... [time, rate]"


def messages(stderr: str) -> list[str]:
    """What a command said on stderr, line by line, without its progress bars (tqdm's, redrawn
    after carriage returns; a line printed while a bar is drawn follows it on its line)."""
    lines = PROGRESS_BAR.sub("", stderr.replace("\r", "\n")).splitlines()
    return [line for line in lines if line.strip()]


class TrainingHook:
    """Counts a run's train calls (`calls`) and the steps they take (`steps`, `per_call`); before
    call number `at` it runs `before()`; that call's loss is replaced by `loss` if it is given."""

    def __init__(self, at: int | None = None, before=None, loss: float | None = None,
                 log: Path | None = None):
        self.at, self.before, self.loss, self.log = at, before, loss, log
        self.calls, self.per_call = 0, []

    @property
    def steps(self) -> int:
        return sum(self.per_call)

    def enter(self, steps: int) -> bool:
        """Called as a train call of `steps` steps starts; whether it is the call `at`."""
        self.calls += 1
        if self.calls == self.at and self.before:
            self.before()
        self.per_call.append(steps)
        if self.log:
            self.log.write_text(json.dumps(self.per_call))
        return self.calls == self.at


def install_hook(framework: str, hook: TrainingHook, setattr=setattr) -> TrainingHook:
    """Wrap `framework`'s train calls ("flax": the chunk `flax_impl.core.make_train_chunk`
    makes; "torch": `torch_ref.core.train_step`) with `hook`; `setattr`: monkeypatch's, in a
    test."""
    if framework == "flax":
        import jax.numpy as jnp

        from flax_impl import core

        make_train_chunk = core.make_train_chunk

        def hooked_make_train_chunk(*args, **kwargs):
            chunk = make_train_chunk(*args, **kwargs)

            def hooked_chunk(state, images, labels, indices, keys):
                chosen = hook.enter(len(indices))
                state, metrics = chunk(state, images, labels, indices, keys)
                if chosen and hook.loss is not None:
                    metrics = {**metrics, "loss": jnp.full_like(metrics["loss"], hook.loss)}
                return state, metrics

            return hooked_chunk

        setattr(core, "make_train_chunk", hooked_make_train_chunk)
    else:
        import torch

        from torch_ref import core

        train_step = core.train_step

        def hooked_train_step(*args, **kwargs):
            chosen = hook.enter(1)
            loss = train_step(*args, **kwargs)
            return torch.full_like(loss, hook.loss) if chosen and hook.loss is not None else loss

        setattr(core, "train_step", hooked_train_step)
    return hook


@pytest.fixture
def hook_training(monkeypatch):
    """`hook_training(framework, **TrainingHook's arguments)`: a TrainingHook on the train calls
    of the runs this test starts in its own process."""
    return lambda framework, **kwargs: install_hook(framework, TrainingHook(**kwargs),
                                                    monkeypatch.setattr)


def taken_signal() -> int | None:
    """The signal a training loop of this process has taken as its request to stop at the next
    chunk (flax_impl.common.signals), if any."""
    from flax_impl.common.signals import SignalWatch

    return SignalWatch.active.signal if SignalWatch.active is not None else None


def signal_self(signum: int) -> None:
    """Send `signum` to this process and return once the running training loop has taken it
    (its delivery, through a watcher thread, is then no race with the loop's next check). Fails
    instead where no loop would take it as a request to stop: the signal would end the test's
    own process."""
    from flax_impl.common.signals import SignalWatch

    if SignalWatch.active is None or not SignalWatch.active.stop_first:
        pytest.fail("no training loop here takes a signal as a request to stop")
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 60  # a guard against a hang, not a measurement
    while taken_signal() != signum:
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not take signal {signum}")
        time.sleep(0.001)


HOOK_ENV = "MNIST20K_TEST_HOOK"  # "DIRECTORY" or "DIRECTORY:N" (see `hooked_main`)


def hooked_main() -> int:
    """`python -c '...hooked_main()' MODULE ARGS...`: MODULE's `main(ARGS)` with a TrainingHook
    from $MNIST20K_TEST_HOOK: it logs the steps of each train call to DIRECTORY/steps.PID and, with
    N, waits before call N: it writes DIRECTORY/paused.PID, then waits for DIRECTORY/go, or for
    a signal that the training loop takes as a request to stop (then it writes
    DIRECTORY/signalled.PID and goes on; a signal that stops the process at once ends it)."""
    import importlib

    module, *argv = sys.argv[1:]
    directory, _, at = os.environ[HOOK_ENV].partition(":")
    directory = Path(directory)

    def pause():
        (directory / f"paused.{os.getpid()}").touch()
        deadline = time.monotonic() + 600  # a guard against a test that never says go
        while not (directory / "go").exists() and time.monotonic() < deadline:
            if taken_signal() is not None:  # a signal the run stops at: it goes on to stop
                (directory / f"signalled.{os.getpid()}").touch()
                return
            time.sleep(0.01)

    install_hook("flax" if module.startswith("flax_impl") else "torch",
                 TrainingHook(int(at) if at else None, pause, log=directory / f"steps.{os.getpid()}"))
    return importlib.import_module(module).main(argv)


def start_hooked(module: str, argv: list[str], directory: Path, pause_at: int | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """Start `python -m module argv` under a TrainingHook logging into `directory` and, with
    `pause_at`, pausing before that train call (`wait_paused`, `say_go`)."""
    directory.mkdir(parents=True, exist_ok=True)
    hook = f"{directory}:{pause_at}" if pause_at else str(directory)
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.conftest import hooked_main; "
                               "sys.exit(hooked_main())", module, *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**(env or os.environ), HOOK_ENV: hook})


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for `process` to end; what it printed and its exit status."""
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_paused(processes: list[subprocess.Popen], directory: Path, state: str = "paused",
                timeout: float = 300) -> None:
    """Return once each of `processes` waits at its pause (`state` "signalled": once it has
    taken a signal there); fail if one ends first."""
    deadline = time.monotonic() + timeout  # a guard against a hang, not a measurement
    while not all((directory / f"{state}.{p.pid}").exists() for p in processes):
        for process in processes:
            if process.poll() is not None:
                result = finish(process)
                pytest.fail(f"the run ended before it was {state} ({result.returncode}): "
                            f"{result.stderr[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {state} within {timeout} s")
        time.sleep(0.02)


def say_go(directory: Path) -> None:
    """Let the paused processes of `directory` go on."""
    (directory / "go").touch()


def steps_logged(directory: Path, process: subprocess.Popen) -> list[int]:
    """The steps of each train call `process` started (its hook's log)."""
    path = directory / f"steps.{process.pid}"
    return json.loads(path.read_text()) if path.exists() else []


def request_stop_during_call(monkeypatch, call: int) -> TrainingHook:
    """Make `flax_impl.train`'s runs get the stop request a first SIGTERM gives during their train
    call number `call` (a chunk): the loop saves a checkpoint before the next call and raises
    TrainingStopped. No real signal: its delivery (a watcher thread) is not the test's to time.
    Returns the hook counting the train calls."""
    import contextlib
    import signal
    import types

    from flax_impl import train as flax_train

    watch = types.SimpleNamespace(signal=None)
    monkeypatch.setattr(flax_train, "stop_requests",
                        lambda *args, **kwargs: contextlib.nullcontext(watch))
    return install_hook("flax", TrainingHook(call, lambda: setattr(watch, "signal",
                                                                    signal.SIGTERM)),
                        monkeypatch.setattr)
