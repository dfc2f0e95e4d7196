"""flax_impl.model: shapes, parameter budget, BatchNorm conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl.core import jit_init
from flax_impl.model import BatchNorm, Net, SeedNet, create_model
from tests.conftest import normal


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("model", [Net(), SeedNet()])
def test_output_is_log_probabilities_of_shape_b_by_10(model):
    x = normal(0, (5, 28, 28, 1))
    variables = jit_init(model.init)(jax.random.key(1), x)
    log_probs = jax.jit(model.apply)(variables, x)
    assert log_probs.shape == (5, 10)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)


def test_net_and_widenet_have_fewer_than_20k_parameters_tinynet_7k_and_seednet_far_more():
    x = jnp.zeros((1, 28, 28, 1))
    net = jax.eval_shape(lambda: Net().init(jax.random.key(0), x))
    tiny = jax.eval_shape(lambda: create_model("tinynet").init(jax.random.key(0), x))
    wide = jax.eval_shape(lambda: create_model("widenet").init(jax.random.key(0), x))
    seed = jax.eval_shape(lambda: SeedNet().init(jax.random.key(0), x))
    assert count(net["params"]) == 17_064 < 20_000
    assert count(tiny["params"]) == 6_734 < 7_000
    assert count(wide["params"]) == 19_816 < 20_000
    assert count(seed["params"]) == 6_379_786
    assert set(net) == {"params", "batch_stats"} and set(seed) == {"params"}


def test_batchnorm_keeps_torchs_unbiased_running_variance():
    x = normal(0, (4, 3, 3, 2)) * 3 + 1
    variables = jit_init(lambda key, x: BatchNorm().init(key, x, train=True))(
        jax.random.key(1), x)
    _, updates = jax.jit(BatchNorm().apply, static_argnames=("train", "mutable"))(
        variables, x, train=True, mutable=("batch_stats",))
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)


def test_train_mode_normalises_with_the_batch_and_eval_with_running_stats():
    x = normal(0, (8, 2, 2, 3)) * 5 + 2
    variables = jit_init(lambda key, x: BatchNorm().init(key, x, train=False))(
        jax.random.key(1), x)
    apply = jax.jit(BatchNorm().apply, static_argnames=("train", "mutable"))
    trained = apply(variables, x, train=True, mutable=("batch_stats",))[0]
    np.testing.assert_allclose(trained.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(apply(variables, x, train=False), x / np.sqrt(1 + 1e-5),
                               rtol=1e-5)


def test_dropout_drops_whole_channels_only_in_training():
    model = Net(dropout=0.5)
    x = normal(0, (4, 28, 28, 1))
    variables = jit_init(model.init)(jax.random.key(1), x)
    evaluate = jax.jit(model.apply)
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))

    @jax.jit
    def train(key):
        return model.apply(variables, x, train=True, rngs={"dropout": key},
                           mutable=["batch_stats"])[0]

    assert not np.allclose(train(jax.random.key(2)), train(jax.random.key(3)))


def test_both_frameworks_start_from_torchs_default_initialisation():
    import torch

    from torch_ref.model import create_model as create_torch_model

    torch.manual_seed(0)
    torch_kernel = create_torch_model("widenet").block6.conv.weight.detach().numpy()
    init = jit_init(create_model("widenet").init)  # one program, not one per operation
    params = init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    flax_kernel, head_bias = np.asarray(params["block6"]["conv"]["kernel"]), params["head"]["bias"]
    bound = 1 / np.sqrt(9 * 24)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3 * 3 * 24
    for kernel in (flax_kernel, torch_kernel):
        assert np.abs(kernel).max() <= bound
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.05)
    assert np.abs(np.asarray(head_bias)).max() <= 1 / np.sqrt(32)
