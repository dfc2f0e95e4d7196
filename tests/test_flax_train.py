"""flax_impl.train: a run writes its workdir and prints the seed's lines; the same seed gives the
same run; a stopped run resumes where it stopped; steps per call; evaluation batches; validation;
the compilation cache."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl import core
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.common.errors import TrainingStopped
from flax_impl.common.workdir import read_metrics
from flax_impl.extras import compile_cache
from flax_impl.model import to_inputs
from flax_impl.predict import restore_variables
from tests.conftest import (
    ROOT,
    SHAPE_BATCH_SIZE,
    SHAPE_EPOCHS,
    SHAPE_STEPS,
    SHAPE_STEPS_PER_CALL,
    TrainingHook,
    install_hook,
    request_stop_during_call,
    synthetic_mnist,
)


def shape_config(source: str, **overrides) -> Config:
    """A run of the suite's shape (conftest.FLAX_RUN) when trained at SHAPE_STEPS_PER_CALL."""
    return Config(data_source=source, epochs=SHAPE_EPOCHS, batch_size=SHAPE_BATCH_SIZE,
                  **overrides)


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


# The stop lands in epoch 2: during its first chunk, so the run stops before its second.
STOP_CALL = SHAPE_STEPS // SHAPE_STEPS_PER_CALL + 1
STOP_STEP = SHAPE_STEPS_PER_CALL  # where epoch 2 stands at the stop


@pytest.fixture(scope="module")
def runs(tiny_idx_source, tmp_path_factory):
    """One training of the suite's shape run through, and the same training stopped in epoch 2
    (as a first SIGTERM stops it) and resumed; what each printed, and the train steps the
    resumed one ran."""
    root = tmp_path_factory.mktemp("runs")

    def train(workdir, resume=False):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            history = flax_train.train(shape_config(tiny_idx_source), workdir, resume=resume,
                                       steps_per_call=SHAPE_STEPS_PER_CALL)
        return history, out.getvalue(), err.getvalue()

    straight, out, err = train(root / "straight")
    with pytest.MonkeyPatch.context() as patch:
        request_stop_during_call(patch, STOP_CALL)
        with pytest.raises(TrainingStopped) as stopped:
            train(root / "resumed")
    stopped_metrics = read_metrics(root / "resumed" / "metrics.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        hook = install_hook("flax", TrainingHook(), patch.setattr)
        resumed, resumed_out, _ = train(root / "resumed", resume=True)
    return SimpleNamespace(root=root, straight=straight, out=out, err=err,
                           stopped=str(stopped.value), stopped_metrics=stopped_metrics,
                           resumed=resumed, resumed_out=resumed_out, resumed_steps=hook.per_call)


def test_a_run_writes_its_workdir_and_prints_the_seed_lines(runs):
    workdir = runs.root / "straight"
    assert "Flax on 1 cpu device(s), fast kernels, 4 step(s) per jitted call" in runs.out
    assert runs.out.count("Test set: Average loss: ") == SHAPE_EPOCHS and "/200 (" in runs.out
    assert f"Epoch {SHAPE_EPOCHS}/{SHAPE_EPOCHS}" in runs.err and "loss=" in runs.err  # tqdm
    metrics = read_metrics(workdir / "metrics.jsonl")
    assert metrics == runs.straight and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert set(metrics[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert metrics[-1]["test_accuracy"] > 0.5  # synthetic digits are easy; chance is 0.1
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == "net" and config["framework"] == "flax" and config["api"] == "linen"
    assert (workdir / "curves.png").stat().st_size > 0
    assert set(restore_variables(workdir)) == {"params", "batch_stats"}


def test_same_seed_gives_the_same_metrics(runs):
    # The stopped run is the same training again, in the same process, up to its stop.
    assert [m["epoch"] for m in runs.stopped_metrics] == [1]
    assert timeless(runs.stopped_metrics) == timeless(runs.straight[:1])  # bit for bit


def test_resume_continues_where_the_run_stopped_and_trains_only_the_rest(runs):
    checkpoints = runs.root / "resumed" / "checkpoints"
    assert f"saved a checkpoint at epoch 2, step {STOP_STEP}" in runs.stopped
    assert f"Resumed from {checkpoints}: epoch 2, step {STOP_STEP}/{SHAPE_STEPS}" in \
        runs.resumed_out
    rest = SHAPE_EPOCHS * SHAPE_STEPS - (SHAPE_STEPS + STOP_STEP)
    assert sum(runs.resumed_steps) == rest  # and not the whole run again
    assert runs.resumed_steps == [SHAPE_STEPS_PER_CALL] * (rest // SHAPE_STEPS_PER_CALL)
    assert timeless(runs.resumed) == timeless(runs.straight)  # bit for bit
    assert timeless(read_metrics(runs.root / "resumed" / "metrics.jsonl")) == \
        timeless(runs.straight)


@pytest.mark.slow
def test_the_stock_kernels_train_as_the_fast_ones(runs, tiny_idx_source):
    stock = flax_train.train(shape_config(tiny_idx_source), steps_per_call=SHAPE_STEPS_PER_CALL,
                             kernels="stock")
    # The same batches, keys and maths (the run in `runs`: "auto", the fast kernels on a CPU),
    # summed in other orders: float32's rounding (1e-7) grows step by step at the peak rate, to
    # 8e-4 in these 24 steps on AVX-512 and on (emulated) AVX2; 1e-2 leaves ten times that, and
    # a kernel that computes something else is off by more from the first epoch. The accuracy
    # is not compared: there, the two runs differ by 2 of 200 images at epoch 2.
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose([m[key] for m in stock], [m[key] for m in runs.straight],
                                   rtol=1e-2)


@pytest.mark.slow
def test_steps_per_call_does_not_change_the_training(runs, tiny_idx_source):
    whole_epochs = flax_train.train(shape_config(tiny_idx_source), steps_per_call=SHAPE_STEPS)
    for got, want in zip(whole_epochs, runs.straight, strict=True):
        # The same weights: the same evaluation, bit for bit ...
        assert (got["test_loss"], got["test_accuracy"]) == (want["test_loss"],
                                                            want["test_accuracy"])
        # ... and the same losses, summed per call in float32: in another order (8 terms: at
        # most 7 roundings of 6e-8 each).
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)


def test_evaluation_scores_every_image_once_whatever_its_batch():
    def log_probs(scale, inputs):  # a stand-in model: a few pixels as the logits
        return jax.nn.log_softmax(scale * inputs[:, 10:20, 14, 0])

    data = synthetic_mnist(0, 200)
    images, labels = data.test_images, data.test_labels
    scores = np.asarray(log_probs(1.0, to_inputs(images)))
    want_loss = -scores[np.arange(len(labels)), labels].sum()
    want_correct = int((scores.argmax(-1) == labels).sum())
    rows = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
    for batch in (64, 200):  # 200 = 3 x 64 + 8: the last batch padded with 56 blank images
        loss, correct = core.make_evaluate(log_probs, batch, rows)(1.0, images, labels)
        assert float(loss) == pytest.approx(want_loss, rel=1e-5)  # 200 terms, float32 vs 64
        assert int(correct) == want_correct


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_validation_holds_out_the_last_images_and_scores_on_them(tiny_idx_source, tmp_path,
                                                                 capsys, framework):
    from torch_ref import train as torch_train

    train = flax_train.train if framework == "flax" else torch_train.train
    config = dataclasses.replace(shape_config(tiny_idx_source), epochs=2, validation=128)
    history = train(config, tmp_path)
    out = capsys.readouterr()
    assert "Validation set: Average loss: " in out.out and "/128 (" in out.out
    assert "Test set" not in out.out and "final validation accuracy" in out.out
    assert "Epoch 2/2" in out.err and "/6 [" in out.err  # (512 - 128) // 64 steps
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    assert read_metrics(tmp_path / "metrics.jsonl") == history


def test_validation_must_leave_images_to_train_on(tiny_idx_source, capsys):
    assert flax_train.main(["--data-source", tiny_idx_source, "--validation", "512"]) == 2
    assert "--validation 512 leaves none of the 512 training images" in capsys.readouterr().err


def test_the_compilation_cache_is_where_it_is_told_to_be_or_off(tmp_path, monkeypatch):
    def setting():
        return jax.config.jax_compilation_cache_dir

    original = setting()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)  # as a user has it
        monkeypatch.setenv(compile_cache.ENV, "off")
        assert compile_cache.use_compilation_cache() is None and setting() is None
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "moved"))
        moved = tmp_path / "moved" / compile_cache.machine_key()
        assert compile_cache.use_compilation_cache() == moved and setting() == str(moved)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
        assert compile_cache.use_compilation_cache() == tmp_path / "users"  # the user's own
        assert setting() == str(tmp_path / "users")
    finally:
        jax.config.update("jax_compilation_cache_dir", original)
    assert not (tmp_path / "xdg").exists()


# A fresh process that turns the cache on as the commands do, compiles one small program and
# says where the cache is, how many programs it compiled and how many it found there.
CACHE_SCRIPT = """
import jax, jax.numpy as jnp
from flax_impl.extras.compile_cache import use_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
print(use_compilation_cache())
jax.jit(lambda x: x * 2)(jnp.arange(3.0)).block_until_ready()
print(events.count("/jax/compilation_cache/cache_misses"),
      events.count("/jax/compilation_cache/cache_hits"))
"""


@pytest.mark.slow
def test_a_second_process_compiles_nothing_from_the_default_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # as a user has it
    env.pop(compile_cache.ENV, None)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")

    def run():
        return subprocess.run([sys.executable, "-c", CACHE_SCRIPT], cwd=ROOT, env=env,
                              check=True, capture_output=True, text=True).stdout.split()

    directory = tmp_path / "xdg" / "mnist20k" / "jax" / compile_cache.machine_key()
    where, compiled, found = run()
    assert where == str(directory) and int(compiled) > 0 and found == "0"
    entries = sorted(p.name for p in directory.iterdir())
    assert len(entries) >= int(compiled)  # each program kept
    assert run() == [str(directory), "0", compiled]  # all found there: none compiled again
    assert sorted(p.name for p in directory.iterdir()) == entries
