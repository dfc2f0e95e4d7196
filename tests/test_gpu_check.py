"""compare.gpu_check: the orchestration with stub steps, and each of its measurements on its own,
small, on the CPU (the real steps are the commands their own tests cover)."""

from __future__ import annotations

import importlib.util
import json
import time

import jax
import numpy as np
import pytest

from compare import gpu_check
from compare.gpu_check import Step
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.common.data import load_mnist, write_cache
from tests.conftest import (
    SHAPE_BATCH_SIZE,
    SHAPE_EPOCHS,
    SHAPE_STEPS,
    SHAPE_STEPS_PER_CALL,
    synthetic_mnist,
)

TRAINING_STUB = """
import json, pathlib, sys
workdir = pathlib.Path(sys.argv[1])
workdir.mkdir(parents=True)
config = dict(framework="flax", recipe="fast", model="widenet", epochs=2)
(workdir / "config.json").write_text(json.dumps(config))
metrics = [dict(epoch=1, test_accuracy=0.99, seconds=1.5),
           dict(epoch=2, test_accuracy=0.995, seconds=1.5)]
(workdir / "metrics.jsonl").write_text("".join(json.dumps(m) + chr(10) for m in metrics))
print("trained")
"""  # (no braces: a step's arguments are formatted with {out}, {work} and {data})
STUBS = (
    Step("ok", ("-c", "print('stub ok', end='')"), 30, "one.log"),
    Step("fails", ("-c", "import sys; print('stub fails'); sys.exit(3)"), 30, "one.log"),
    Step("overruns", ("-c", "import time; time.sleep(60)"), 1, "two.log"),
    Step("flax_fast", ("-c", TRAINING_STUB, "{work}/fast"), 30, "two.log", workdir="{work}/fast"),
    Step("result", ("-c", "import json, sys; open(sys.argv[1], 'w').write(json.dumps("
                          "dict(answer=42)))", "{work}/result.json"), 30, "one.log",
         result="{work}/result.json", quick=("--small",), full=("--big",)),
)


@pytest.fixture
def no_devices(monkeypatch):
    """`devices` without starting jax and torch in a child."""
    monkeypatch.setattr(gpu_check, "devices", lambda env: {"jax_backend": "cpu"})


def test_each_step_runs_with_its_limit_and_a_failure_or_overrun_leaves_the_others(
        tmp_path, no_devices, capsys):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out)], steps=STUBS) == 1
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["ok", "fails", "overruns", "flax_fast", "result"]
    assert [steps[name]["exit"] for name in steps] == [0, 3, "timeout", 0, 0]
    assert steps["overruns"]["limit"] == 1
    # the logs: each step's output after a header naming its command, in the order they ran
    one = (out / "one.log").read_text().splitlines()
    assert one[0].startswith("== ok: python -c") and one[1] == "stub ok"
    assert one[2].startswith("== fails: python -c") and one[3] == "stub fails"
    assert one[4].startswith("== result: python -c") and one[4].endswith("--big")
    # what a step leaves: a training's config and metrics, a result file
    assert steps["flax_fast"]["config"] == {"recipe": "fast", "model": "widenet", "epochs": 2}
    assert [m["epoch"] for m in steps["flax_fast"]["metrics"]] == [1, 2]
    assert steps["result"]["result"] == {"answer": 42}
    assert summary["time_to_99_4"]["flax"]["epoch"] == 2
    printed = capsys.readouterr().out
    assert "fails: exit 3" in printed and "overruns: exit timeout" in printed
    assert "failed or skipped: fails, overruns" in printed
    assert sorted(p.name for p in out.iterdir()) == ["one.log", "summary.json", "two.log"]


def test_steps_runs_the_chosen_steps_and_quick_their_small_flags(tmp_path, no_devices):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--steps", "result,ok", "--quick"],
                          steps=STUBS) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == ["result", "ok"] and summary["quick"]
    assert (out / "one.log").read_text().splitlines()[0].endswith("--small")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(out), "--steps", "ok,nope"], steps=STUBS)


def test_a_step_with_too_little_time_left_is_skipped_and_reported(tmp_path, no_devices,
                                                                   monkeypatch, capsys):
    # The check's deadline leaves the first step (which sleeps a second) and nothing after it.
    monkeypatch.setattr(gpu_check, "TOTAL_SECONDS", gpu_check.MIN_STEP_SECONDS + 0.5)
    steps = (Step("sleeps", ("-c", "import time; time.sleep(1)"), 30, "one.log"), STUBS[0])
    assert gpu_check.main(["--out", str(tmp_path)], steps=steps) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["sleeps"]["exit"] == 0
    assert summary["steps"]["sleeps"]["limit"] <= gpu_check.TOTAL_SECONDS  # capped by it
    assert summary["steps"]["ok"]["exit"] == "skipped"
    assert "ok: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("quick", [False, True])
def test_every_step_of_the_check_runs_a_module_here_full_or_small(tmp_path, monkeypatch, quick,
                                                                    no_devices):
    commands = {}

    def record(step, argv, limit, out, env):
        commands[step.name] = (argv, env)
        return {"exit": 0, "seconds": 0.0, "limit": limit}

    monkeypatch.setattr(gpu_check, "run_step", record)
    gpu_check.main(["--out", str(tmp_path), *(["--quick"] if quick else [])])
    assert list(commands) == ["peak", "parity", "speed", "phases", "flax_fast", "torch_fast",
                              "flax_train", "torch_train"]
    for argv, _ in commands.values():
        assert argv[0] == "-m" and importlib.util.find_spec(argv[1]) is not None, argv
        assert not any("{" in part for part in argv), argv  # every placeholder filled
    assert ("--ablation" in commands["speed"][0]) is not quick
    for name in ("phases", "flax_fast", "torch_fast", "flax_train", "torch_train"):
        assert ("--epochs" in commands[name][0]) is quick
    cache = commands["phases"][1]["MNIST20K_JAX_CACHE"]  # the phases step compiles cold
    assert cache.startswith(gpu_check.tempfile.gettempdir())
    assert len({step.log for step in gpu_check.STEPS} | {"summary.json", "speed.json"}) <= 8


def test_the_peak_is_two_n_cubed_flops_over_the_fastest_run(monkeypatch):
    ticks = iter([0.0, 2.0, 2.0, 3.0, 3.0, 7.0])  # runs of 2, 1 and 4 seconds
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(ticks))
    runs = []
    found = gpu_check.best_gflops(lambda: runs.append(1), size=1000, repeats=3)
    assert len(runs) == 4  # a warm-up, then the timed runs
    assert found["gflops"] == 2 * 1000 ** 3 / 1.0 / 1e9
    assert found["median_gflops"] == 2 * 1000 ** 3 / 2.0 / 1e9


def test_the_peak_child_measures_jax_on_its_default_device(tmp_path):
    assert gpu_check.main(["--peak-json", str(tmp_path / "peak.json"), "--peak-size", "64"]) == 0
    found = json.loads((tmp_path / "peak.json").read_text())
    assert found["jax"]["device"] == str(jax.devices()[0]) and found["jax"]["size"] == 64
    assert found["jax"]["gflops"] > 0
    assert found["torch"] is None  # torch's is measured on CUDA only


def test_the_step_share_is_the_steps_flops_over_each_frameworks_peak():
    speed = {"batch_size": 100, "train_flops_per_image": 1e7,
             "flax": {"step": {"median_ms": 1.0}}, "torch": {"step": {"median_ms": 4.0}}}
    share = gpu_check.step_share(speed, {"jax": {"gflops": 4000.0}, "torch": None})
    assert share["flax"] == {"gflops": 1000.0, "peak_gflops": 4000.0, "share_of_peak": 0.25}
    assert share["torch"] == {"gflops": 250.0, "peak_gflops": None, "share_of_peak": None}


def test_time_to_99_4_sums_the_epoch_seconds_up_to_the_first_epoch_there():
    metrics = [{"epoch": 1, "test_accuracy": 0.990, "seconds": 5.0},
               {"epoch": 2, "test_accuracy": 0.9941, "seconds": 1.5},
               {"epoch": 3, "test_accuracy": 0.9939, "seconds": 1.5}]
    assert gpu_check.time_to_target(metrics) == {"epoch": 2, "seconds": 6.5,
                                                 "final_accuracy": 0.9939, "epochs": 3}
    missed = gpu_check.time_to_target(metrics[:1])
    assert missed["epoch"] is None and missed["seconds"] is None
    assert gpu_check.target_line("torch", missed) == \
        "torch: 99.4 % not reached (1 epoch(s), final 99.00 %)"
    assert gpu_check.target_line("flax", gpu_check.time_to_target(metrics)) == \
        "flax: 99.4 % at epoch 2, after 6.5 s of training"


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, tiny_idx_source):
    """The phases child, in this process, on the tiny source at the suite's run shape, as if
    started 100 s ago; and the product's own training of the same config."""
    tmp = tmp_path_factory.mktemp("timed")
    flags = ["--data-source", tiny_idx_source, "--epochs", str(SHAPE_EPOCHS), "--batch-size",
             str(SHAPE_BATCH_SIZE), "--steps-per-call", str(SHAPE_STEPS_PER_CALL)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNIST20K_CACHE", str(tmp / "cache"))
        patch.setenv(gpu_check.SPAWNED_AT, repr(time.time() - 100))
        assert gpu_check.main(["--phases-json", str(tmp / "phases.json"), "--workdir",
                               str(tmp / "work"), *flags]) == 0
        product = flax_train.train(Config(data_source=tiny_idx_source, epochs=SHAPE_EPOCHS,
                                          batch_size=SHAPE_BATCH_SIZE),
                                   steps_per_call=SHAPE_STEPS_PER_CALL)
    return json.loads((tmp / "phases.json").read_text()), product, tmp / "work"


def test_the_timed_run_trains_as_the_product_does(timed_run):
    timed, product, _ = timed_run
    drop_seconds = [{k: v for k, v in m.items() if k != "seconds"} for m in product]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in timed["history"]] == \
        drop_seconds
    assert (timed["epochs"], timed["steps_per_epoch"], timed["steps_per_call"]) == (
        SHAPE_EPOCHS, SHAPE_STEPS, SHAPE_STEPS_PER_CALL)


def test_the_timed_run_times_each_phase_and_each_programs_compilation(timed_run):
    timed, _, workdir = timed_run
    assert list(timed["phases"]) == list(gpu_check.PHASES)
    assert timed["phases"]["startup"] >= 100  # from the process's start, not the imports'
    assert all(timed["phases"][name] > 0 for name in ("data", "compile", "steps", "evaluation",
                                                      "checkpoints"))
    assert sorted(timed["programs"]) == ["evaluate", "init", "plan",
                                         f"train_chunk[{SHAPE_STEPS_PER_CALL}]"]
    assert sum(timed["programs"].values()) <= timed["phases"]["compile"]
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert kept == [(SHAPE_EPOCHS - 1) * SHAPE_STEPS, SHAPE_EPOCHS * SHAPE_STEPS]  # Orbax keeps 2


def test_the_phase_split_adds_what_no_phase_holds_and_reports_each_phase():
    timed = {"phases": {"startup": 3.0, "compile": 5.0, "steps": 2.0}, "recipe": "default",
             "epochs": 20, "steps_per_epoch": 468}
    split = gpu_check.phase_split(timed, whole_seconds=12.0)
    assert split["seconds"] == {"startup": 3.0, "compile": 5.0, "steps": 2.0, "other": 2.0}
    assert split["shares"]["compile"] == 5 / 12 and sum(split["shares"].values()) == 1
    assert gpu_check.phase_line(split, timed) == (
        "a whole run of the default recipe, 20 epochs of 468 steps: 12.0 s = startup 3.0 s, "
        "compile 5.0 s, steps 2.0 s, other 2.0 s")


def test_the_summary_joins_the_peak_the_speed_the_split_and_the_times_to_99_4():
    metrics = [{"epoch": 1, "test_accuracy": 0.995, "seconds": 4.0}]
    summary = {"steps": {
        "peak": {"result": {"jax": {"gflops": 2000.0, "device": "cuda:0"}, "torch": None}},
        "speed": {"result": {"batch_size": 128, "train_flops_per_image": 1e7,
                             "flax": {"step": {"median_ms": 1.28}},
                             "torch": {"step": {"median_ms": 2.56}}}},
        "phases": {"seconds": 10.0, "result": {"phases": {"steps": 4.0}, "recipe": "default",
                                               "epochs": 1, "steps_per_epoch": 4}},
        "flax_fast": {"metrics": metrics}, "torch_fast": {"metrics": []}}}
    lines = gpu_check.derived(summary)
    assert summary["speed_share"]["flax"]["share_of_peak"] == pytest.approx(0.5)
    assert summary["phase_split"]["seconds"]["other"] == 6.0
    assert summary["time_to_99_4"]["flax"]["seconds"] == 4.0
    assert lines == [
        "peak, float32 matrix product at full precision: jax 2,000 GFLOP/s on cuda:0",
        "training step: flax 1,000.0 GFLOP/s = 50.0 % of the measured 2,000 GFLOP/s peak; "
        "torch 500.0 GFLOP/s",
        "a whole run of the default recipe, 1 epoch of 4 steps: 10.0 s = steps 4.0 s, "
        "other 6.0 s",
        "fast recipe to 99.4 %: flax: 99.4 % at epoch 1, after 4.0 s of training; torch: "
        "99.4 % not reached (no epoch)"]


def test_a_packed_cache_unpacks_to_the_same_verified_arrays(tmp_path, monkeypatch):
    mnist = synthetic_mnist(64, 16)
    write_cache(tmp_path / "cache" / "mnist.npz", mnist, "idx")
    monkeypatch.setenv("MNIST20K_CACHE", str(tmp_path / "cache"))
    assert gpu_check.main(["--pack", str(tmp_path / "mnist.npz.gz")]) == 0
    gpu_check.unpack_cache(tmp_path / "mnist.npz.gz", tmp_path / "elsewhere")
    loaded = load_mnist("auto", cache=tmp_path / "elsewhere")
    for got, want in zip(loaded, mnist, strict=True):
        np.testing.assert_array_equal(got, want)
