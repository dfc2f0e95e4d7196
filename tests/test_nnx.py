"""The NNX port (flax_impl/nnx_model.py, nnx_train.py) as NNX users write it: `nnx.Rngs`,
`model.train()` / `model.eval()`, `nnx.Optimizer` and the NNX step; `--api nnx` through the
product's loop, its resume, `evaluate` and `predict`; its weight conversions."""

from __future__ import annotations

import functools
import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from PIL import Image

from flax_impl import core, evaluate, nnx_model, nnx_train, predict
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.common.errors import TrainingStopped
from flax_impl.common.models import MODELS
from flax_impl.common.workdir import read_metrics
from flax_impl.model import create_model as create_linen_model
from flax_impl.model import to_inputs
from tests.conftest import (
    SHAPE_BATCH_SIZE,
    SHAPE_EPOCHS,
    SHAPE_STEPS,
    SHAPE_STEPS_PER_CALL,
    TrainingHook,
    install_hook,
    normal,
    request_stop_during_call,
    synthetic_mnist,
    write_idx_dir,
)
from tests.test_flax_model import BN_BIAS, BN_INPUT, BN_SCALE, torch_batch_norm_reference

X = jnp.zeros((1, 28, 28, 1), jnp.float32)


def numpy_leaves(tree) -> list[np.ndarray]:
    """A tree's leaves as arrays (random keys as their data), for comparing."""
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(numpy_leaves(got), numpy_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


@nnx.jit
def forward(model, x):
    return model(x)


# --- The modules ------------------------------------------------------------------------------

def test_rngs_draw_the_weights_the_same_seed_the_same_and_another_seed_others():
    def params(seed):
        model = nnx_model.create_model("net", rngs=nnx.Rngs(seed))
        return traverse_util.flatten_dict(nnx_model.variables_of(model)["params"])

    first, again, other = params(0), params(0), params(1)
    assert_trees_equal(again, first)
    drawn = [path for path in first if path[-1] == "kernel" or path == ("head", "bias")]
    assert len(drawn) == 8  # six convolutions, the head's kernel and bias
    for path in drawn:
        assert not np.allclose(other[path], first[path]), path


def test_dropout_draws_from_the_models_own_stream():
    x = normal(0, (4, 28, 28, 1))

    def model(dropout_seed):
        return nnx_model.create_model("net", 0.5, rngs=nnx.Rngs(params=0, dropout=dropout_seed))

    seeded, again, other = model(1), model(1), model(2)
    first = np.asarray(forward(seeded, x))
    np.testing.assert_array_equal(np.asarray(forward(again, x)), first)  # the same masks
    assert not np.allclose(np.asarray(forward(other, x)), first)  # another seed, others
    assert not np.allclose(np.asarray(forward(seeded, x)), first)  # the stream moved on


def test_train_and_eval_switch_dropout_and_batchnorm():
    x = normal(0, (4, 28, 28, 1))
    model = nnx_model.create_model("net", 0.5, rngs=nnx.Rngs(0))

    def statistics():
        return numpy_leaves(nnx_model.variables_of(model)["batch_stats"])

    initial = statistics()
    model.eval()
    evaluated = np.asarray(forward(model, x))
    np.testing.assert_array_equal(np.asarray(forward(model, x)), evaluated)  # no dropout
    assert all(np.array_equal(a, b) for a, b in zip(statistics(), initial, strict=True))
    no_dropout = nnx_model.create_model("net", 0.0, rngs=nnx.Rngs(0))  # the same weights
    no_dropout.eval()
    np.testing.assert_array_equal(np.asarray(forward(no_dropout, x)), evaluated)
    model.train()
    trained = np.asarray(forward(model, x))
    assert not np.allclose(trained, evaluated)
    assert not np.allclose(np.asarray(forward(model, x)), trained)  # dropout draws anew
    assert all(not np.array_equal(a, b) for a, b in zip(statistics(), initial, strict=True))


def test_batchnorm_trains_keeps_statistics_and_evaluates_as_torch_does():
    trained, mean, var, evaluated = torch_batch_norm_reference(BN_INPUT, BN_SCALE, BN_BIAS, 2)
    bn = nnx_model.BatchNorm(5)
    bn.scale[...], bn.bias[...] = jnp.asarray(BN_SCALE), jnp.asarray(BN_BIAS)
    # Against torch's float32 BatchNorm, as linen's test: sums in another order, a few 1e-7.
    for want in trained:  # two steps: the momentum compounds as torch's
        np.testing.assert_allclose(np.asarray(forward(bn, BN_INPUT)), want, rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), var, rtol=1e-5)
    bn.use_running_average = True  # what model.eval() sets
    np.testing.assert_allclose(np.asarray(forward(bn, BN_INPUT)), evaluated, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_has_linens_variable_names_and_shapes(name):
    module = nnx.eval_shape(lambda: nnx_model.create_model(name, rngs=nnx.Rngs(0)))
    linen = jax.eval_shape(lambda: create_linen_model(name).init(jax.random.key(0), X))
    shapes = functools.partial(jax.tree.map, lambda x: (x.shape, x.dtype))
    assert shapes(nnx_model.variables_of(module)) == shapes(linen)


# --- The train step -----------------------------------------------------------------------------

def test_the_step_updates_the_modules_in_place_and_functional_step_is_that_step():
    config = Config(batch_size=16, max_rotation=0.0)  # dropout on (rotation: a smaller program)
    tx = core.create_optimizer(config, 10)
    data = synthetic_mnist(16, 1)
    batch = (jnp.asarray(data.train_images), jnp.asarray(data.train_labels))
    keys = [jax.random.key(i) for i in range(2)]

    # As NNX users write it: the modules, stepped in place under nnx.jit.
    model, optimizer = nnx_train.create_modules(config, jax.random.key(0), tx)
    initial = numpy_leaves(nnx.state((model, optimizer)))  # copies: the modules change
    before = numpy_leaves(nnx_model.variables_of(model)["params"])
    step = nnx.jit(functools.partial(nnx_train.train_step, config=config))
    losses = [float(step(model, optimizer, batch, key)["loss"]) for key in keys]
    assert int(optimizer.step[...]) == 2
    assert int(model.block1.dropout.rngs.count[...]) == 2  # a fork of the stream, per step
    after = numpy_leaves(nnx_model.variables_of(model)["params"])
    assert all(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))

    # The same step as a pure function of the modules' state, through jax.jit.
    graphdef, state = nnx.split(nnx_train.create_modules(config, jax.random.key(0), tx))
    assert all(np.array_equal(a, b) for a, b in zip(numpy_leaves(state), initial, strict=True))
    pure_step = jax.jit(nnx_train.functional_step(graphdef, config))
    pure_losses = []
    for key in keys:
        state, metrics = pure_step(state, batch, key)
        pure_losses.append(float(metrics["loss"]))
    assert pure_losses == losses
    assert_trees_equal(state, nnx.state((model, optimizer)))


# --- --api nnx through the product --------------------------------------------------------------

def shape_config(source: str) -> Config:
    """The suite's run shape (conftest.FLAX_RUN) in NNX."""
    return Config(data_source=source, epochs=SHAPE_EPOCHS, batch_size=SHAPE_BATCH_SIZE, api="nnx")


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def dropout_count(state) -> int:
    """How many masks the first block's dropout has drawn (a train state's RNG count)."""
    return int(state[0]["block1"]["dropout"]["rngs"]["count"][...])


STOP_CALL = SHAPE_STEPS // SHAPE_STEPS_PER_CALL + 1  # epoch 2's first chunk: stops before its second
STOP_STEP = SHAPE_STEPS_PER_CALL


@pytest.fixture(scope="module")
def runs(tiny_idx_source, tmp_path_factory):
    """One NNX training of the suite's shape run through, and the same training stopped in
    epoch 2 (as a first SIGTERM stops it) and resumed; for each, what it printed and the state
    and model function its last evaluation scored; the train steps the resumed one ran."""
    root = tmp_path_factory.mktemp("nnx_runs")

    def train(workdir, patch, resume=False):
        scored = {}
        make_evaluate = core.make_evaluate

        def recording_make_evaluate(log_probs, *args):
            evaluate = make_evaluate(log_probs, *args)

            def recorded(state, images, labels):
                scored.update(log_probs=log_probs, state=state)
                return evaluate(state, images, labels)

            return recorded

        patch.setattr(core, "make_evaluate", recording_make_evaluate)
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(io.StringIO()):
            history = flax_train.train(shape_config(tiny_idx_source), workdir, resume=resume,
                                       steps_per_call=SHAPE_STEPS_PER_CALL)
        return SimpleNamespace(history=history, out=out.getvalue(), **scored)

    with pytest.MonkeyPatch.context() as patch:
        straight = train(root / "straight", patch)
    with pytest.MonkeyPatch.context() as patch:
        request_stop_during_call(patch, STOP_CALL)
        with pytest.raises(TrainingStopped) as stopped:
            train(root / "resumed", patch)
    with pytest.MonkeyPatch.context() as patch:
        hook = install_hook("flax", TrainingHook(), patch.setattr)
        resumed = train(root / "resumed", patch, resume=True)
    return SimpleNamespace(root=root, straight=straight, stopped=str(stopped.value),
                           resumed=resumed, resumed_steps=hook.per_call)


def test_api_nnx_trains_through_the_products_loop_into_its_workdir(runs):
    workdir = runs.root / "straight"
    assert "Flax (NNX) on 1 cpu device(s)" in runs.straight.out
    metrics = read_metrics(workdir / "metrics.jsonl")
    assert metrics == runs.straight.history and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["test_accuracy"] > 0.5  # synthetic digits are easy; chance is 0.1
    # The state trained and checkpointed is the NNX modules': the model's own dropout stream
    # drew one mask a step.
    assert dropout_count(runs.straight.state) == SHAPE_EPOCHS * SHAPE_STEPS
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == \
        [(SHAPE_EPOCHS - 1) * SHAPE_STEPS, SHAPE_EPOCHS * SHAPE_STEPS]  # the latest two kept


def test_resuming_an_nnx_workdir_continues_its_steps_and_its_dropout_stream(runs):
    checkpoints = runs.root / "resumed" / "checkpoints"
    assert f"saved a checkpoint at epoch 2, step {STOP_STEP}" in runs.stopped
    assert f"Resumed from {checkpoints}: epoch 2, step {STOP_STEP}/{SHAPE_STEPS}" in \
        runs.resumed.out
    rest = SHAPE_EPOCHS * SHAPE_STEPS - (SHAPE_STEPS + STOP_STEP)
    assert runs.resumed_steps == [SHAPE_STEPS_PER_CALL] * (rest // SHAPE_STEPS_PER_CALL)
    # The stream went on from the checkpoint's count: the masks of the uninterrupted run, and
    # so its metrics, bit for bit.
    assert dropout_count(runs.resumed.state) == dropout_count(runs.straight.state)
    assert timeless(runs.resumed.history) == timeless(runs.straight.history)


def test_evaluate_and_predict_score_exactly_what_the_training_scored(runs, tmp_path, capsys):
    workdir, out = runs.root / "straight", ["--out", str(tmp_path / "pictures")]
    scored = functools.partial(runs.straight.log_probs, runs.straight.state)  # its last evaluation
    # On the run's test set, evaluate counts what the training reported ...
    correct = round(runs.straight.history[-1]["test_accuracy"] * 200)
    assert evaluate.main(["--workdir", str(workdir), *out]) == 0
    assert f"Test accuracy: {correct}/200 (" in capsys.readouterr().out
    # ... and on digits one row lower, where that model errs (its count tells weights apart,
    # 100 % above does not), what that model counts.
    digits = synthetic_mnist(64, 200, seed=9)
    lower = digits._replace(test_images=np.roll(digits.test_images, 1, axis=1))
    source = f"idx:{write_idx_dir(tmp_path / 'lower', lower)}"
    scores = np.asarray(scored(to_inputs(jnp.asarray(lower.test_images))))
    correct = int((scores.argmax(-1) == lower.test_labels).sum())
    assert 0 < correct < 200
    assert evaluate.main(["--workdir", str(workdir), "--data-source", source, *out]) == 0
    counted = int(re.search(r"Test accuracy: (\d+)/200 \(", capsys.readouterr().out)[1])
    # This call runs operation by operation, evaluate's program fused: float32 rounds otherwise
    # (about 1e-7), so an image whose two likeliest digits lie that close may go either way.
    best, second = np.sort(scores, -1)[:, :-3:-1].T
    assert abs(counted - correct) <= np.sum(best - second <= 1e-5)

    image = tmp_path / "digit.png"
    Image.fromarray(synthetic_mnist(0, 1, seed=3).test_images[0]).save(image)
    probs = np.exp(np.asarray(scored(to_inputs(jnp.asarray(predict.read_image(image))[None]))))[0]
    digit = int(probs.argmax())
    assert predict.main(["--workdir", str(workdir), str(image)]) == 0
    assert capsys.readouterr().out == f"{image}: {digit} ({100 * probs[digit]:.1f}%)\n"


def test_the_api_is_recorded_in_the_runs_config_and_a_bad_one_is_one_line(runs, capsys):
    record = json.loads((runs.root / "straight" / "config.json").read_text())
    assert record["api"] == "nnx" and record["framework"] == "flax"
    with pytest.raises(SystemExit) as exit:
        flax_train.main(["--api", "haiku"])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "invalid choice: 'haiku'" in lines[0], lines
