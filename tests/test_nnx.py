"""The NNX port (flax_impl/nnx_model.py): linen's weights, outputs, gradients and runs; its
conversions; its workdirs read by evaluate, predict and linen."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from compare import convert, parity
from flax_impl import evaluate, nnx_model, predict
from flax_impl import train as flax_train
from flax_impl.common.config import Config
from flax_impl.common.workdir import read_metrics
from flax_impl.core import jit_init
from flax_impl.model import create_model as create_linen_model
from flax_impl.train import restore_variables
from tests.conftest import crash_in_epoch, normal, synthetic_mnist
from torch_ref.model import create_model as create_torch_model

X = jnp.zeros((1, 28, 28, 1), jnp.float32)


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Net in the quick subset; the other networks (each initialisation a program to compile) in
# the full suite.
@pytest.mark.parametrize("name", ["net", *(pytest.param(name, marks=pytest.mark.slow)
                                           for name in ("tinynet", "widenet", "seednet"))])
def test_one_key_gives_linens_variables_names_shapes_and_values(name):
    key, images = jax.random.key(5), normal(6, (4, 28, 28, 1))
    linen = create_linen_model(name)
    linen_variables = jit_init(linen.init)(key, X)

    split = nnx_model.SplitModel.of(functools.partial(nnx_model.create_model, name))
    variables = jit_init(split.init)(key, X)  # the NNX module built inside one program
    assert_trees_equal(variables, linen_variables)
    np.testing.assert_array_equal(np.asarray(jax.jit(split.apply)(variables, images)),
                                  np.asarray(jax.jit(linen.apply)(linen_variables, images)))


@pytest.mark.slow
def test_outputs_statistics_and_gradients_equal_linens_with_dropout_on():
    checks = parity.check_nnx_against_linen(synthetic_mnist(parity.BATCH, 1), "net")
    assert len(checks) == 5 and all(check.passed for check in checks), parity.format_rows(checks)


@pytest.mark.parametrize("name", ["tinynet", "seednet"])
def test_torch_nnx_and_linen_conversions_are_lossless(name):
    torch.manual_seed(0)
    original = create_torch_model(name).state_dict()
    module = convert.torch_to_nnx(original, name)
    back = convert.nnx_to_torch(module, name)
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    linen = convert.nnx_to_linen(module, name)
    assert_trees_equal(linen, convert.torch_to_flax(original, name))
    assert_trees_equal(convert.nnx_to_linen(convert.linen_to_nnx(linen, name), name), linen)


def test_conversion_errors_name_the_key_and_shape():
    linen = jax.tree.map(np.asarray, jit_init(create_linen_model("net").init)(jax.random.key(0), X))
    with pytest.raises(convert.ConversionError, match=r"'batch_stats/block1/bn/mean' has shape "
                                                      r"\[10\], tinynet needs \[8\]"):
        convert.linen_to_nnx(linen, "tinynet")
    del linen["batch_stats"]["block3"]["bn"]["var"]
    with pytest.raises(convert.ConversionError, match="missing variable 'batch_stats/block3/bn/var'"):
        convert.linen_to_nnx(linen)
    with pytest.raises(convert.ConversionError, match="unexpected variable 'params/conv1/bias' for net"):
        convert.nnx_to_linen(nnx.eval_shape(lambda: nnx_model.create_model(
            "seednet", key=jax.random.key(0))), "net")  # its shapes suffice


def short(source: str, **overrides) -> Config:
    return Config(data_source=source, epochs=3, batch_size=64, eval_batch_size=100, **overrides)


@pytest.fixture(scope="module")
def runs(tiny_idx_source, tmp_path_factory):
    """A short run in each API (the default kernels), and the NNX one crashed and resumed."""
    root = tmp_path_factory.mktemp("runs")
    histories = {api: flax_train.train(short(tiny_idx_source, api=api), root / api)
                 for api in ("linen", "nnx")}
    with pytest.MonkeyPatch.context() as patch:
        crash_in_epoch(patch, flax_train, 3)
        with pytest.raises(KeyboardInterrupt):
            flax_train.train(short(tiny_idx_source, api="nnx"), root / "resumed")
    histories["resumed"] = flax_train.train(short(tiny_idx_source, api="nnx"), root / "resumed",
                                            resume=True)
    return root, histories


def timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


@pytest.mark.slow
def test_a_short_nnx_run_ends_with_linens_metrics_and_resumes_as_it_ran(runs):
    root, histories = runs
    linen, nnx = timeless(histories["linen"]), timeless(histories["nnx"])
    assert [m["epoch"] for m in nnx] == [1, 2, 3]
    for key in ("train_loss", "test_loss", "test_accuracy"):  # float tolerance: rtol 1e-6
        np.testing.assert_allclose([m[key] for m in nnx], [m[key] for m in linen], rtol=1e-6)
    assert timeless(read_metrics(root / "resumed" / "metrics.jsonl")) == nnx


@pytest.mark.slow
def test_an_nnx_checkpoint_restores_into_linen_and_a_linen_one_into_nnx(runs):
    root, _ = runs
    images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    from_nnx = restore_variables(root / "nnx")
    linen_out = create_linen_model("net", 0.0).apply(from_nnx, images)
    np.testing.assert_array_equal(np.asarray(convert.linen_to_nnx(from_nnx)(images)),
                                  np.asarray(linen_out))
    from_linen = convert.linen_to_nnx(restore_variables(root / "linen"))
    np.testing.assert_array_equal(
        np.asarray(from_linen(images)),
        np.asarray(create_linen_model("net").apply(restore_variables(root / "linen"), images)))


@pytest.mark.slow
def test_evaluate_and_predict_read_an_nnx_workdir(runs, tmp_path, capsys):
    root, histories = runs
    assert evaluate.main(["--workdir", str(root / "nnx"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    correct = int(out.split("Test accuracy: ")[1].split("/")[0])
    assert correct == round(histories["nnx"][-1]["test_accuracy"] * 200)  # as it scored it
    image = tmp_path / "digit.png"
    Image.fromarray(synthetic_mnist(0, 1, seed=3).test_images[0]).save(image)
    assert predict.main(["--workdir", str(root / "nnx"), str(image)]) == 0
    nnx_line = capsys.readouterr().out
    assert predict.main(["--workdir", str(root / "linen"), str(image)]) == 0
    assert capsys.readouterr().out == nnx_line  # the same weights, the same answer


def test_the_api_is_recorded_and_a_bad_one_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        flax_train.main(["--api", "haiku"])
    assert exit.value.code == 2
    assert "invalid choice: 'haiku'" in capsys.readouterr().err
    config = dataclasses.replace(Config(), api="nnx")
    assert config.to_json().count('"api": "nnx"') == 1
