"""compare.gpu_check: the prepared accelerator check, run small on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compare import gpu_check
from flax_impl.common.data import load_mnist, write_cache
from tests.conftest import synthetic_mnist


@pytest.mark.slow
def test_quick_check_runs_every_step_and_writes_at_most_eight_files(tiny_idx_source, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    assert gpu_check.main(["--quick", "--out", str(out), "--data-source", tiny_idx_source]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == ["parity", "speed", "flax_train", "torch_train",
                                      "flax_fast", "torch_fast"]
    assert all(step["exit"] == 0 for step in summary["steps"].values())
    assert summary["devices"]["jax_backend"] == "cpu" and summary["quick"]
    assert "3 passed, 0 failed" in (out / "parity.txt").read_text()
    assert json.loads((out / "speed.json").read_text())["paired_step_speedup"] > 0
    for training in ("flax_train", "torch_train", "flax_fast", "torch_fast"):
        assert [m["epoch"] for m in summary["steps"][training]["metrics"]] == [1]
        assert "Test set: Average loss" in (out / f"{training}.log").read_text()
    for framework in ("flax", "torch"):
        assert summary["steps"][f"{framework}_train"]["config"]["model"] == "net"
        assert summary["steps"][f"{framework}_fast"]["config"] == {
            "recipe": "fast", "model": "widenet", "epochs": 1}  # --quick: 1 epoch
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8, files  # what the device tool brings back
    assert "every step passed" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_step_is_reported_and_the_others_still_run(tiny_idx_source, tmp_path,
                                                             monkeypatch):
    steps = [("parity", ["compare.parity", "--device", "tpu"], 60, ()),
             *[step for step in gpu_check.FULL_STEPS if step[0] == "flax_train"]]
    monkeypatch.setattr(gpu_check, "FULL_STEPS", steps)
    out = tmp_path / "out"
    assert gpu_check.main(["--quick", "--out", str(out), "--data-source", tiny_idx_source]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["parity"]["exit"] == 2
    assert summary["steps"]["flax_train"]["exit"] == 0
    assert "invalid choice: 'tpu'" in (out / "parity.txt").read_text()


def test_a_packed_cache_unpacks_to_the_same_verified_arrays(tmp_path, monkeypatch):
    mnist = synthetic_mnist(64, 16)
    write_cache(tmp_path / "cache" / "mnist.npz", mnist, "idx")
    monkeypatch.setenv("MNIST20K_CACHE", str(tmp_path / "cache"))
    assert gpu_check.main(["--pack", str(tmp_path / "mnist.npz.gz")]) == 0
    gpu_check.unpack_cache(tmp_path / "mnist.npz.gz", tmp_path / "elsewhere")
    loaded = load_mnist("auto", cache=tmp_path / "elsewhere")
    for got, want in zip(loaded, mnist, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("quick", [False, True])
def test_only_the_full_check_times_the_ablation(tmp_path, monkeypatch, quick):
    commands = {}

    def record(name, argv, limit, out, env):
        commands[name] = argv
        return {"exit": 0, "seconds": 0.0, "limit": limit}

    monkeypatch.setattr(gpu_check, "devices", lambda env: {"jax_backend": "cpu"})
    monkeypatch.setattr(gpu_check, "run_step", record)
    assert gpu_check.main(["--out", str(tmp_path), *(["--quick"] if quick else [])]) == 0
    assert list(commands) == [name for name, *_ in gpu_check.FULL_STEPS]
    assert ("--ablation" in commands["speed"]) is not quick
    assert ("--epochs" in commands["flax_train"]) is quick
