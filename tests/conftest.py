"""Shared fixtures: small synthetic datasets in the formats the loaders read."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
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


# The suite's one Flax run shape: the tiny source's 512 images (`tiny_idx_source`), 8 steps of
# 64 an epoch in two jitted calls (a signal can stop a run mid-epoch), the default evaluation
# batch. The training tests that are not about the shape train with it, in or out of process,
# so the compilation cache holds their programs once.
SHAPE_BATCH_SIZE, SHAPE_STEPS_PER_CALL = 64, 4
FLAX_SHAPE = ("--batch-size", str(SHAPE_BATCH_SIZE), "--steps-per-call", str(SHAPE_STEPS_PER_CALL))


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
    """A `--data-source` value for 512 training and 200 test synthetic digits."""
    directory = write_idx_dir(tmp_path_factory.mktemp("tiny_idx"), synthetic_mnist(512, 200))
    return f"idx:{directory}"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own empty MNIST cache unless it asks for the real one."""
    monkeypatch.setenv("MNIST20K_CACHE", str(tmp_path / "cache"))
