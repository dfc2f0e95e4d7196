"""flax_impl.extras.kernels: stock Flax and the fast CPU kernels build equal models and equal runs."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl import augment, core, setup
from flax_impl.common.config import Config
from flax_impl.common.errors import ConfigError
from flax_impl.common.models import MODELS
from flax_impl.extras import fast
from flax_impl.extras.kernels import FAST, STOCK, get_kernels, resolve
from flax_impl.model import batch_normalize, create_model
from tests.conftest import SHAPE_BATCH_SIZE, SHAPE_STEPS_PER_CALL, normal, synthetic_mnist
from torch_ref.model import create_model as create_torch_model


def build(name: str, dropout: float = 0.05, kernels="auto"):
    return setup.build_model(Config(model=name, dropout=dropout), kernels)


def test_auto_is_fast_on_cpu_and_stock_elsewhere():
    assert resolve("auto", "cpu") == "fast"
    assert resolve("auto", "gpu") == resolve("auto", "tpu") == "stock"
    assert resolve("stock", "cpu") == "stock" and resolve("fast", "gpu") == "fast"
    assert get_kernels("auto") is (FAST if jax.default_backend() == "cpu" else STOCK)
    with pytest.raises(ValueError, match="unknown kernels 'quick'"):
        resolve("quick")


def test_stock_kernels_are_plain_flax_and_fast_ones_are_the_cpu_kernels():
    assert STOCK.conv is nn.Conv and STOCK.max_pool is nn.max_pool
    assert STOCK.rotate is augment.rotate
    stock, quick = build("net", kernels="stock"), build("net", kernels="fast")
    assert stock.conv is nn.Conv and stock.max_pool is nn.max_pool
    conv = quick.conv.keywords["conv_general_dilated"]
    assert conv is fast.conv_general_dilated
    assert quick.max_pool is fast.max_pool and FAST.rotate is fast.rotate
    assert quick.normalize is STOCK.batch_normalize is batch_normalize  # one device: stock


def test_a_batch_spread_over_devices_gets_kernels_that_train_each_share():
    split = get_kernels("fast", batch_axis="data")
    assert split.batch_axis == "data" and split.conv_general_dilated is fast.conv_general_dilated
    normalize = split.batch_normalize
    assert normalize.func is fast.batch_normalize and normalize.keywords == {"axis_name": "data"}
    assert get_kernels("fast", batch_axis="data") is split  # one Kernels per split: one program
    assert get_kernels("stock", batch_axis="data") is STOCK and FAST.batch_axis is None
    model = setup.build_model(Config(), split)
    assert model.batch_axis == "data" and model.normalize is normalize
    run = setup.setup_training(Config(batch_size=64, eval_batch_size=64),
                               synthetic_mnist(128, 64), devices=jax.devices()[:1],
                               kernels="fast")
    assert run.kernels is FAST  # one device: the program XLA splits, as ever


def model_loss_and_grads(name: str, kernels: str, dtype) -> tuple:
    x = normal(0, (8, 28, 28, 1), dtype)
    model = build(name, 0.0, kernels)
    variables = jax.tree.map(lambda v: v.astype(dtype),
                             core.jit_init(create_model(name, 0.0).init)(jax.random.key(1), x))

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(10.0, dtype=dtype))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


# SeedNet in float64 only: XLA:CPU's own float32 gradients of its wide convolutions are up to
# 1 % from float64 (the fast kernels' are 1e-6), so float32 would test XLA's rounding.
@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("net", np.float32), ("net", np.float64),
                                         ("seednet", np.float64)])
def test_stock_and_fast_models_give_equal_outputs_and_gradients(name, dtype):
    with jax.enable_x64(dtype == np.float64):
        (stock_loss, stock_grads), (fast_loss, fast_grads) = (
            model_loss_and_grads(name, kernels, dtype) for kernels in ("stock", "fast"))
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(fast_loss, stock_loss, rtol=tolerance)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(stock_grads), strict=True):
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)


@pytest.mark.slow
def test_a_short_run_gives_equal_metrics_with_either_kernels():
    # The suite's run shape: the fast kernels' run shares its programs with the other tests'.
    config = Config(epochs=2, batch_size=SHAPE_BATCH_SIZE)
    data = synthetic_mnist(512, 200)

    def run(kernels):
        run = setup.setup_training(config, data, kernels=kernels,
                                   steps_per_call=SHAPE_STEPS_PER_CALL)
        state, losses = run.state, []
        for epoch in range(1, config.epochs + 1):
            for first, last in core.chunk_bounds(run.steps_per_epoch, run.steps_per_call):
                state, metrics = run.run_chunk(state, run.plan(epoch), first, last)
                losses += list(np.asarray(metrics["loss"]))
        return np.array(losses), run.score(state)

    (stock_losses, (stock_loss, stock_correct)), (fast_losses, (fast_loss, fast_correct)) = (
        run("stock"), run("fast"))
    # Same batches, keys and maths; float32 rounding differs (other summation orders) and 16
    # steps at the peak learning rate amplify it to a few parts in a thousand.
    np.testing.assert_allclose(fast_losses, stock_losses, rtol=1e-2)
    assert fast_loss == pytest.approx(stock_loss, rel=1e-2)
    assert abs(fast_correct - stock_correct) <= 2


def test_both_frameworks_build_every_model_of_the_one_table_at_its_widths():
    for name, spec in MODELS.items():
        flax_model, torch_model = create_model(name), create_torch_model(name)
        assert flax_model.widths == spec.widths
        first_conv = torch_model.block1.conv if spec.family == "net" else torch_model.conv1
        assert first_conv.out_channels == spec.widths[0]
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        create_model("resnet")
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        create_torch_model("resnet")


def test_widths_given_replace_the_tables_in_both_frameworks():
    widths = (6, 8, 10, 10, 12, 12)
    assert create_model("net", widths=widths).widths == widths
    assert create_torch_model("net", widths=widths).block6.conv.out_channels == 12
    assert build("net").widths == MODELS["net"].widths  # the table is untouched
    with pytest.raises(ConfigError, match="--widths needs 6 positive integers"):
        create_model("net", widths=(8, 10))


def test_a_variant_is_a_replaced_field_not_a_patch():
    variant = dataclasses.replace(FAST, max_pool=nn.max_pool)
    model = build("net", kernels=variant)
    assert model.max_pool is nn.max_pool and model.conv is FAST.conv
    assert FAST.max_pool is fast.max_pool  # the original is untouched
