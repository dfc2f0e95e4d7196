"""flax_impl.model (linen): output, the model table's budgets and widths, BatchNorm's torch
conventions, channel dropout, torch's initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_impl.common.errors import ConfigError
from flax_impl.common.models import MODELS, PARAMETER_LIMIT, ModelSpec, conv_layers
from flax_impl.model import BatchNorm, ConvBlock, Net, create_model
from tests.conftest import normal
from torch_ref.model import create_model as create_torch_model

X = jnp.zeros((1, 28, 28, 1), jnp.float32)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_output_is_log_probabilities_of_shape_b_by_10():
    model, x = Net(), normal(0, (5, 28, 28, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    log_probs = jax.jit(model.apply)(variables, x)
    assert log_probs.shape == (5, 10)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)  # 10 terms, float32


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_stays_under_its_budget_with_torchs_parameter_count(name):
    spec = MODELS[name]
    variables = jax.eval_shape(lambda: create_model(name).init(jax.random.key(0), X))
    parameters = count(variables["params"])
    torch_parameters = sum(p.numel() for p in create_torch_model(name).parameters())
    assert spec.budget <= PARAMETER_LIMIT
    assert parameters < spec.budget
    assert parameters == torch_parameters  # the same network, counted in each framework
    assert set(variables) == {"params", "batch_stats"}


def test_both_frameworks_build_every_model_of_the_table_at_its_widths():
    for name, spec in MODELS.items():
        assert create_model(name).widths == spec.widths
        convs = [m for m in create_torch_model(name).modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == len(spec.layout) - spec.layout.count("M")
        assert [conv.out_channels for conv in convs if conv.groups == 1] == list(spec.widths)
    for create in (create_model, create_torch_model):
        with pytest.raises(ConfigError, match="unknown model 'resnet'"):
            create("resnet")


def test_an_x_token_is_a_bare_depthwise_convolution_in_every_port():
    # XSepNet: Xception's separable convolution, the depthwise one without BatchNorm, ReLU or
    # dropout; the 1x1 block after it normalises.
    plan = [layer for layer in conv_layers(MODELS["xsepnet"].layout, MODELS["xsepnet"].widths)
            if layer != "M"]
    bare = [layer.name for layer in plan if not layer.normalized]
    assert bare == [f"block{i}" for i in range(2, 14, 2)]
    assert all(layer.groups == layer.in_features and not layer.dropout
               for layer in plan if not layer.normalized)
    variables = jax.eval_shape(create_model("xsepnet", dropout=0.5).init, jax.random.key(0), X)
    assert set(variables["params"]["block2"]) == {"conv"}
    assert "block2" not in variables["batch_stats"] and "block3" in variables["batch_stats"]
    torch_net = create_torch_model("xsepnet", dropout=0.5)
    assert [name for name, _ in torch_net.block2.named_children()] == ["conv"]
    x = torch.randn(2, 8, 6, 6)
    torch_net.train()
    assert torch.equal(torch_net.block2(x), torch_net.block2.conv(x))  # no dropout, no ReLU


def test_a_layout_is_the_blocks_and_pools_every_port_builds():
    spec = MODELS["sepnet"]
    plan = conv_layers(spec.layout, spec.widths)
    assert plan[5] == "M" and plan.count("M") == 1
    stem, depthwise, mix = plan[:3]
    assert (stem.in_features, stem.features, stem.kernel_size, stem.groups) == (1, 8, 3, 1)
    assert (depthwise.in_features, depthwise.features, depthwise.groups) == (8, 8, 8)
    assert (mix.in_features, mix.features, mix.kernel_size, mix.groups) == (8, 16, 1, 1)
    blocks = [layer for layer in plan if layer != "M"]
    assert [block.name for block in blocks] == [f"block{i}" for i in range(1, 14)]
    assert [block.dropout for block in blocks] == [True] * 12 + [False]  # not the last
    variables = jax.eval_shape(create_model("sepnet").init, jax.random.key(0), X)
    assert variables["params"]["block2"]["conv"]["kernel"].shape == (3, 3, 1, 8)
    assert create_torch_model("sepnet").block2.conv.groups == 8
    with pytest.raises(ConfigError, match="--widths needs 7 positive integers for sepnet"):
        create_model("sepnet", widths=MODELS["net"].widths)
    for layout, widths, refused in [(("3", "q"), (4,), "token 'q'"), (("M",), (), "no conv"),
                                    (("3",) * 14, (4,) * 14, "no pixel"), (("3", "3"), (4,), "2 widths")]:
        with pytest.raises(ValueError, match=refused):  # a table entry that cannot be built
            ModelSpec(widths, layout=layout)


def test_widths_given_replace_the_tables_in_both_frameworks():
    widths = (6, 8, 10, 10, 12, 12)
    assert create_model("net", widths=widths).widths == widths
    assert create_torch_model("net", widths=widths).block6.conv.out_channels == 12
    assert create_model("net").widths == MODELS["net"].widths  # the table is untouched
    with pytest.raises(ConfigError, match="--widths needs 6 positive integers"):
        create_model("net", widths=(8, 10))


def torch_batch_norm_reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, steps: int):
    """torch.nn.BatchNorm2d on NHWC `x`: the train-mode output of each of `steps` calls, then the
    running mean and variance, then the eval-mode output."""
    bn = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(scale))
        bn.bias.copy_(torch.tensor(bias))
        nchw = torch.tensor(x).permute(0, 3, 1, 2)
        trained = [bn.train()(nchw).permute(0, 2, 3, 1).numpy() for _ in range(steps)]
        evaluated = bn.eval()(nchw).permute(0, 2, 3, 1).numpy()
    return trained, bn.running_mean.numpy(), bn.running_var.numpy(), evaluated


BN_INPUT = normal(0, (4, 3, 3, 5)) * 3 + 1  # 36 values a channel: biased != unbiased variance
BN_SCALE, BN_BIAS = normal(1, (5,)) + 1, normal(2, (5,))


def test_batchnorm_trains_keeps_statistics_and_evaluates_as_torch_does():
    """Batch statistics (the biased variance) in training, torch's momentum and its *unbiased*
    variance in the running average, and the running statistics in evaluation."""
    trained, mean, var, evaluated = torch_batch_norm_reference(BN_INPUT, BN_SCALE, BN_BIAS, 2)
    variables = {"params": {"scale": BN_SCALE, "bias": BN_BIAS},
                 "batch_stats": {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}}
    apply = jax.jit(BatchNorm().apply, static_argnames=("train", "mutable"))
    # The reference is torch's float32 BatchNorm: means and variances of a few dozen numbers of
    # order 1, summed in another order, a few 1e-7 apart; 1e-5 also bounds them on a GPU.
    for want in trained:  # two steps: the momentum compounds as torch's
        out, updates = apply(variables, BN_INPUT, train=True, mutable=("batch_stats",))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        variables = {**variables, **updates}
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables["batch_stats"]["var"], var, rtol=1e-5)
    np.testing.assert_allclose(apply(variables, BN_INPUT, train=False), evaluated, rtol=1e-5,
                               atol=1e-5)


@jax.jit
def block_outputs(x, key):
    """A ConvBlock's train-mode output with dropout 0.5 and, from the same variables, without
    dropout (BatchNorm on the batch's statistics in both)."""
    dropping, keeping = ConvBlock(8, 0.5), ConvBlock(8, 0.0)
    variables = dropping.init(jax.random.key(0), x, train=False)

    def train(block):
        return block.apply(variables, x, train=True, rngs={"dropout": key},
                           mutable=["batch_stats"])[0]

    return train(dropping), train(keeping)


def test_dropout_drops_whole_channels_in_training():
    dropped, kept = map(np.asarray, block_outputs(normal(0, (6, 10, 10, 3)), jax.random.key(1)))
    whole = (dropped == 0).all(axis=(1, 2))  # (n, c): the whole 8x8 map is zero
    assert not (kept == 0).all(axis=(1, 2)).any()  # no map is zero without dropout
    for n, c in np.ndindex(*whole.shape):
        if not whole[n, c]:  # a map that is not dropped is kept whole, scaled by 1 / (1 - 0.5)
            # (one float32 product each: within an ulp, 1.2e-7)
            np.testing.assert_allclose(dropped[n, :, :, c], 2 * kept[n, :, :, c], rtol=1e-6)
    assert 0 < whole.sum() < whole.size  # some maps dropped, some kept


@jax.jit
def net_outputs(x, key, other):
    """Net's outputs with dropout 0.5 in evaluation (with two dropout keys) and in training, and
    its evaluation without dropout; the same variables (dropout has none)."""
    variables = Net(dropout=0.0).init(jax.random.key(0), x)

    def output(dropout, train, key):
        return Net(dropout=dropout).apply(variables, x, train=train, rngs={"dropout": key},
                                          mutable=["batch_stats"])[0]

    return {"eval": output(0.5, False, key), "eval, other key": output(0.5, False, other),
            "eval without dropout": output(0.0, False, key),
            "train": output(0.5, True, key)}


def test_dropout_is_off_in_evaluation():
    out = jax.tree.map(np.asarray, net_outputs(normal(0, (4, 28, 28, 1)), jax.random.key(2),
                                               jax.random.key(3)))
    # Whatever key is given, evaluation draws nothing: no dropout at all.
    np.testing.assert_array_equal(out["eval, other key"], out["eval"])
    np.testing.assert_array_equal(out["eval without dropout"], out["eval"])
    assert not np.allclose(out["train"], out["eval"])  # (what training drops: the test above)


def test_both_frameworks_start_from_torchs_default_initialisation():
    torch.manual_seed(0)
    torch_kernel = create_torch_model("widenet").block6.conv.weight.detach().numpy()
    params = jax.jit(create_model("widenet").init)(jax.random.key(0), X)["params"]
    flax_kernel, head_bias = np.asarray(params["block6"]["conv"]["kernel"]), params["head"]["bias"]
    bound = 1 / np.sqrt(9 * 24)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3 * 3 * 24
    for kernel in (flax_kernel, torch_kernel):
        assert np.abs(kernel).max() <= bound
        # 9,216 draws from U(-b, b): their standard deviation is within 1 % of b / sqrt(3) but
        # for a 1 in 10^6 seed; the same draws on every machine (counter-based keys, torch's
        # seeded generator), so 5 % is checked once and holds everywhere.
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.05)
    assert np.abs(np.asarray(head_bias)).max() <= 1 / np.sqrt(32)
