"""flax_impl.train: the step learns, runs write their workdir, resume, data parallelism, output."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import core, setup
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.common.workdir import read_metrics
from tests.conftest import SHAPE_BATCH_SIZE, SHAPE_STEPS_PER_CALL, child_env, crash_in_epoch, synthetic_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_config(source: str, **overrides) -> Config:
    config = Config(data_source=source, epochs=2, batch_size=64, eval_batch_size=100)
    return dataclasses.replace(config, **overrides)


def shape_config(source: str, **overrides) -> Config:
    """A run of the suite's shape (conftest.FLAX_SHAPE) when trained at SHAPE_STEPS_PER_CALL."""
    return dataclasses.replace(Config(data_source=source, batch_size=SHAPE_BATCH_SIZE),
                               **overrides)


# XLA's default backend optimisation level, named: the suite's XLA_FLAGS lower it (conftest).
XLA_DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}


@pytest.mark.slow
def test_the_initial_state_is_compiled_lightly_and_holds_the_same_bits(monkeypatch):
    config = Config(ema_decay=0.9)
    model, tx = setup.build_model(config), core.create_optimizer(config, 100)
    light = core.create_train_state(jax.random.key(7), model, tx, ema=True)
    assert core.LIGHT_COMPILER_OPTIONS == {"xla_backend_optimization_level": 1}
    monkeypatch.setattr(core, "LIGHT_COMPILER_OPTIONS", XLA_DEFAULT_LEVEL)
    default = core.create_train_state(jax.random.key(7), model, tx, ema=True)
    for a, b in zip(jax.tree.leaves(light), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_the_evaluation_is_compiled_lightly_and_scores_the_same_bits(monkeypatch):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    run = setup.setup_training(Config(epochs=1, batch_size=64, eval_batch_size=100),
                               synthetic_mnist(64, 300))
    state, _ = run.run_chunk(run.state, run.plan(1), 0, 1)  # BatchNorm statistics updated once
    variables = core.eval_variables(state)
    light = run.evaluate(variables, *run.eval_data)
    monkeypatch.setattr(core, "LIGHT_COMPILER_OPTIONS", XLA_DEFAULT_LEVEL)
    rows = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
    default = core.make_evaluate(run.model, 100, rows)(variables, *run.eval_data)
    for a, b in zip(light, default, strict=True):
        np.testing.assert_array_equal(a, b)


def test_jitted_train_step_lowers_the_loss_on_a_fixed_batch():
    config = Config(max_rotation=0.0, dropout=0.0, epochs=1, train_examples=15 * 64,
                    batch_size=64)
    data = synthetic_mnist(15 * 64, 1)
    run = setup.setup_training(config, data)  # one short one-cycle of 15 steps
    state = run.state
    batch = (jnp.asarray(data.train_images[:64]), jnp.asarray(data.train_labels[:64]))
    step = jax.jit(run.train_step)
    losses = []
    for i in range(15):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 15


def test_schedule_warms_up_to_the_peak_then_decays_to_the_floor():
    config = Config(lr=0.1)
    schedule = core.onecycle_schedule(config, total_steps=100)
    lrs = np.array([schedule(i) for i in range(100)])
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert lrs.argmax() == 29 and lrs.max() == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_the_schedule_computed_from_run_time_values_has_the_bits_of_its_constants():
    from flax_impl.common.config import recipe_config

    @jax.jit
    def from_values(constants, steps):
        return jax.vmap(core.schedule_of(constants))(steps)

    for recipe, lr in (("default", None), ("fast", None), ("tinynet", 1e6)):
        config = recipe_config(recipe) if lr is None else recipe_config(recipe, lr=lr)
        for total in (3, 16, 1407, 9380):
            steps = jnp.arange(total)
            constant = jax.jit(jax.vmap(core.onecycle_schedule(config, total)))(steps)
            values = jax.device_put(core.onecycle_constants(config, total))
            np.testing.assert_array_equal(from_values(values, steps), constant)


@pytest.mark.slow
def test_runs_of_other_lengths_and_rates_share_one_train_chunk_that_steps_as_their_optimizer():
    data = synthetic_mnist(256, 10)
    runs = [setup.setup_training(Config(model="tinynet", epochs=epochs, lr=lr, batch_size=64),
                                 data) for epochs, lr in ((1, 0.05), (7, 0.3))]

    def lowered(run):
        indices, keys = run.plan(1)
        return run.train_chunk.lower(run.state, *run.train_data, indices, keys,
                                     run.schedule).as_text()

    assert lowered(runs[0]) == lowered(runs[1])
    for run in runs:  # the chunk's steps against single steps with the state's own optimizer
        plan = run.plan(2)
        stepped, step = run.state, jax.jit(run.train_step)
        for index, key in zip(*plan, strict=True):
            batch = (run.train_data[0][index], run.train_data[1][index])
            stepped, _ = step(stepped, batch, key)
        chunked, _ = run.run_chunk(run.state, plan, 0, run.steps_per_epoch)
        assert int(chunked.step) == run.steps_per_epoch
        for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(stepped), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_run_of_the_same_settings_reuses_the_programs_and_steps_the_same():
    data = synthetic_mnist(128, 10)
    config = Config(model="tinynet", epochs=1, batch_size=64, eval_batch_size=10)
    first = setup.setup_training(config, data)
    again = setup.setup_training(dataclasses.replace(config, seed=3, recipe="fast",
                                                     data_source="idx:elsewhere"), data)
    assert again.train_chunk is first.train_chunk and again.evaluate is first.evaluate
    assert not np.array_equal(jax.random.key_data(again.key), jax.random.key_data(first.key))
    other = setup.setup_training(dataclasses.replace(config, lr=0.2), data)
    assert other.train_chunk is not first.train_chunk
    widths = [8, 10, 12, 12, 14, 14]  # given as a list, as well as a tuple
    assert setup.setup_training(dataclasses.replace(config, widths=widths), data).train_chunk \
        is setup.setup_training(dataclasses.replace(config, widths=tuple(widths)), data).train_chunk
    setup.programs.cache_clear()
    fresh = setup.setup_training(config, data)
    assert fresh.train_chunk is not first.train_chunk
    reused = setup.setup_training(config, data)
    assert reused.train_chunk is fresh.train_chunk
    ends = [run.run_chunk(run.state, run.plan(1), 0, 2)[0] for run in (first, fresh, reused)]
    for state in ends[1:]:
        for a, b in zip(jax.tree.leaves(ends[0]), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("field, value", [("recipe", "fast"), ("epochs", 5), ("seed", 7),
                                          ("data_source", "idx:x"), ("train_examples", 128),
                                          ("validation", 16)])
def test_the_fields_left_out_of_the_programs_key_change_no_program(field, value):
    """`setup.NEUTRAL_FIELDS` enter no program: built from a config that differs in one, the
    train chunk, the evaluation and the initialisation lower to the same text."""
    assert set(setup.NEUTRAL_FIELDS) == {"recipe", "epochs", "seed", "data_source",
                                         "train_examples", "validation"}
    assert setup.program_key(Config(**{field: value})) == setup.program_key(Config())
    config = Config(model="tinynet", batch_size=64, eval_batch_size=10)
    data, mesh = synthetic_mnist(128, 10), jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    kernels = setup.get_kernels("auto")

    def lowered(config):
        built = setup.programs.__wrapped__(config, 40, kernels, mesh)
        state = built.init(jax.random.key(0))
        indices, keys = np.zeros((2, 64), np.int32), jax.random.split(jax.random.key(0), 2)
        schedule = core.onecycle_constants(config, 40)
        images, labels = data.train_images, data.train_labels
        return (built.train_chunk.lower(state, images, labels, indices, keys, schedule).as_text(),
                built.evaluate.lower(core.eval_variables(state), images, labels).as_text(),
                built.init.lower(jax.random.key(0)).as_text(),
                schedule)  # the numbers the state's optimizer is built on

    assert lowered(dataclasses.replace(config, **{field: value})) == lowered(config)


def test_short_run_writes_its_workdir_and_prints_the_seed_lines(tiny_idx_source, tmp_path,
                                                                 capsys):
    workdir = tmp_path / "run"
    # 384 images: the steps of the validation test's run below, so one compiled program.
    history = flax_train.train(short_config(tiny_idx_source, train_examples=384), workdir)
    out = capsys.readouterr()
    assert out.out.count("Test set: Average loss: ") == 2
    assert "Accuracy: " in out.out and "/200 (" in out.out
    assert "Epoch 2/2" in out.err and "loss=" in out.err  # the tqdm bar
    metrics = read_metrics(workdir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert metrics[-1]["test_accuracy"] == history[-1]["test_accuracy"]
    assert metrics[-1]["test_accuracy"] > 0.5  # synthetic digits are easy
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == "net" and config["framework"] == "flax"
    variables = flax_train.restore_variables(workdir)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.slow
def test_same_seed_gives_the_same_metrics(tiny_idx_source):
    config = shape_config(tiny_idx_source, epochs=1)
    first, second = (flax_train.train(config, steps_per_call=SHAPE_STEPS_PER_CALL)
                     for _ in range(2))
    assert first[0]["train_loss"] == second[0]["train_loss"]
    assert first[0]["test_loss"] == second[0]["test_loss"]


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(tiny_idx_source, tmp_path, monkeypatch):
    config = shape_config(tiny_idx_source, epochs=3)
    train = functools.partial(flax_train.train, config, steps_per_call=SHAPE_STEPS_PER_CALL)
    uninterrupted = train(tmp_path / "straight")

    with monkeypatch.context() as patch:
        crash_in_epoch(patch, flax_train, 3)
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "interrupted")
    resumed = train(tmp_path / "interrupted", resume=True)
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[-1][key] == uninterrupted[-1][key]
    assert [m["epoch"] for m in read_metrics(tmp_path / "interrupted/metrics.jsonl")] == [1, 2, 3]


TWO_DEVICE_SCRIPT = """
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax_impl import setup
from flax_impl.common.config import Config
from tests.conftest import synthetic_mnist
assert len(jax.devices()) == 2
config = Config(epochs=2, batch_size=64, eval_batch_size=100)

data = synthetic_mnist(256, 100)
def one_step(devices):
    run = setup.setup_training(config, data, devices=devices)
    mesh = Mesh(np.array(devices), ("data",))
    batch = jax.device_put((data.train_images[:64], data.train_labels[:64]),
                           NamedSharding(mesh, P("data")))
    new, metrics = jax.jit(run.train_step)(run.state, batch, jax.random.key(0))
    return float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(new)]
(loss1, leaves1), (loss2, leaves2) = one_step(jax.devices()[:1]), one_step(jax.devices())
print(json.dumps({"loss": abs(loss1 - loss2),
                  "state": max(float(np.abs(a - b).max()) for a, b in zip(leaves1, leaves2))}))
"""


@pytest.mark.slow
def test_a_step_on_two_devices_is_the_step_on_one():
    """The step's sharded sums give one device's step (whole runs on two devices against one:
    tests/test_distributed.py::test_flax_two_processes_train_as_one_process_and_resume)."""
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT], cwd=ROOT, env=child_env(2),
                            check=True, capture_output=True, text=True)
    step = json.loads(result.stdout.strip().splitlines()[-1])
    assert step["loss"] < 1e-6 and step["state"] < 1e-5


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_validation_holds_out_the_last_images_and_scores_on_them(tiny_idx_source, tmp_path,
                                                                 capsys, framework):
    from torch_ref import train as torch_train

    train = flax_train.train if framework == "flax" else torch_train.train
    history = train(short_config(tiny_idx_source, validation=128), tmp_path)
    out = capsys.readouterr()
    assert "Validation set: Average loss: " in out.out and "/128 (" in out.out
    assert "Test set" not in out.out and "final validation accuracy" in out.out
    assert "Epoch 2/2" in out.err and "/6 [" in out.err  # (512 - 128) // 64 steps
    assert set(history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    assert read_metrics(tmp_path / "metrics.jsonl") == history


def test_validation_must_leave_images_to_train_on(tiny_idx_source, capsys):
    assert flax_train.main(["--data-source", tiny_idx_source, "--validation", "512"]) == 2
    assert "--validation 512 leaves none of the 512 training images" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_the_moving_average_is_what_is_scored_saved_and_resumed(tiny_idx_source, tmp_path,
                                                                monkeypatch, framework):
    from compare.workdirs import READERS
    from flax_impl.predict import load_trained
    from torch_ref import train as torch_train

    module = flax_train if framework == "flax" else torch_train
    config = short_config(tiny_idx_source, epochs=3, ema_decay=0.9, label_smoothing=0.1)
    straight = module.train(config, tmp_path / "straight")
    # What predict/evaluate load scores what training scored: the averaged weights.
    log_probs, _ = load_trained(tmp_path / "straight", READERS)
    data = synthetic_mnist(512, 200)  # the tiny source's digits
    correct = int((np.asarray(log_probs(jnp.asarray(data.test_images))).argmax(-1)
                   == data.test_labels).sum())
    assert correct == round(straight[-1]["test_accuracy"] * 200)
    without = module.train(dataclasses.replace(config, ema_decay=0.0))
    assert without[-1]["test_loss"] != straight[-1]["test_loss"]
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, module, 3)
        with pytest.raises(KeyboardInterrupt):
            module.train(config, tmp_path / "interrupted")
    resumed = module.train(config, tmp_path / "interrupted", resume=True)
    assert resumed[-1]["test_loss"] == straight[-1]["test_loss"]


# A fresh process that turns the cache on as the commands do and compiles one small program.
CACHE_SCRIPT = """
import jax, jax.numpy as jnp
from flax_impl.extras.compile_cache import use_compilation_cache
print(use_compilation_cache())
jax.jit(lambda x: x * 2)(jnp.arange(3.0)).block_until_ready()
"""


@pytest.mark.slow
def test_a_second_run_compiles_nothing_and_the_cache_can_be_moved_or_turned_off(
        tiny_idx_source, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # as a user has it
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    argv = [sys.executable, "-m", "flax_impl.train", "--data-source", tiny_idx_source,
            "--epochs", "1", "--batch-size", "64"]

    def run(command=argv, **extra):
        return subprocess.run(command, cwd=ROOT, env={**env, **extra}, check=True,
                              capture_output=True, text=True).stdout

    def entries(root):
        return sorted(p.name for p in root.rglob("*") if p.is_file())

    run()
    default = tmp_path / "xdg" / "mnist20k" / "jax"
    first = entries(default)
    assert any("train_chunk" in name for name in first)
    run()
    assert entries(default) == first  # every program came from the cache

    # Moved and off: the same setting in a process that compiles one program, not a training.
    def programs(names):  # an entry's name is the program's and a key (which holds the path)
        return sorted(name.split("-")[0] for name in names)

    script = [sys.executable, "-c", CACHE_SCRIPT]
    assert run(script).strip() == str(next(default.iterdir()))  # where the training wrote
    added = sorted(set(entries(default)) - set(first))
    moved = tmp_path / "moved"
    assert run(script, MNIST20K_JAX_CACHE=str(moved)).strip().startswith(str(moved))
    assert programs(entries(moved)) == programs(added) and "jit__lambda" in programs(added)
    assert run(script, MNIST20K_JAX_CACHE="off",
               XDG_CACHE_HOME=str(tmp_path / "xdg_off")).strip() == "None"
    assert not (tmp_path / "xdg_off" / "mnist20k" / "jax").exists()
