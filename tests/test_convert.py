"""compare.convert: lossless round trips between linen, NNX and torch, and one clear error per bad
key or shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

from compare.convert import (
    ConversionError,
    flax_to_torch,
    linen_model,
    linen_to_nnx,
    nnx_module,
    nnx_to_linen,
    nnx_to_torch,
    torch_model,
    torch_to_flax,
    torch_to_nnx,
)
from flax_impl import nnx_model
from torch_ref.model import Net


def random_torch_state(name: str) -> dict:
    """A torch model `name`'s state_dict with its running statistics off their defaults."""
    torch.manual_seed(0)
    model = torch_model(name)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 2.0)
    return model.state_dict()


def random_linen_variables(name: str) -> dict:
    """Linen variables of `name` (numpy), every array, statistics included, drawn at random."""
    shapes = jax.eval_shape(lambda: linen_model(name).init(jax.random.key(0),
                                                           np.zeros((1, 28, 28, 1), np.float32)))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda leaf: rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32),
                        shapes)


def assert_same_torch_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if not key.endswith("num_batches_tracked"):  # no Flax counterpart: comes back as 0
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def assert_same_variables(got: dict, want: dict) -> None:
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=str(key))


@pytest.mark.parametrize("name", ["net", "tinynet", "widenet", "sepnet", "xsepnet", "seednet"])
def test_torch_to_flax_to_torch_is_lossless(name):
    original = random_torch_state(name)
    back = flax_to_torch(torch_to_flax(original, name), name)
    assert_same_torch_state(back, original)
    torch_model(name).load_state_dict(back)  # strict


@pytest.mark.parametrize("name", ["net", "tinynet", "sepnet", "xsepnet"])
def test_linen_to_nnx_to_linen_is_lossless_and_the_module_holds_the_values(name):
    variables = random_linen_variables(name)
    module = linen_to_nnx(variables, name)
    assert_same_variables(nnx_model.variables_of(module), variables)
    assert_same_variables(nnx_to_linen(module, name), variables)


@pytest.mark.parametrize("name", ["tinynet", "sepnet", "xsepnet", "seednet"])
def test_torch_to_nnx_to_torch_is_lossless(name):
    original = random_torch_state(name)
    module = torch_to_nnx(original, name)
    assert isinstance(module, nnx.Module)
    back = nnx_to_torch(module, name)
    assert_same_torch_state(back, original)
    torch_model(name).load_state_dict(back)  # strict


def test_a_net_state_dict_is_refused_for_tinynet():
    with pytest.raises(ConversionError, match=r"has shape \[10\], tinynet needs \[8\]"):
        torch_to_flax(Net().state_dict(), "tinynet")


def test_flax_layouts_are_hwio_and_in_by_out():
    variables = torch_to_flax(Net().state_dict())
    assert variables["params"]["block2"]["conv"]["kernel"].shape == (3, 3, 10, 16)
    assert variables["params"]["head"]["kernel"].shape == (32, 10)
    assert variables["batch_stats"]["block6"]["bn"]["var"].shape == (32,)


def test_converted_arrays_do_not_alias_torch_buffers():
    model = Net()
    variables = torch_to_flax(model.state_dict())
    with torch.no_grad():
        model.block1.bn.running_mean.fill_(7.0)
        model.block1.conv.weight.fill_(7.0)
    assert not np.any(variables["batch_stats"]["block1"]["bn"]["mean"] == 7.0)
    assert not np.any(variables["params"]["block1"]["conv"]["kernel"] == 7.0)


def test_missing_extra_and_misshapen_keys_are_named():
    state_dict = Net().state_dict()
    with pytest.raises(ConversionError, match="missing key 'block3.bn.running_var'"):
        torch_to_flax({k: v for k, v in state_dict.items() if k != "block3.bn.running_var"})
    with pytest.raises(ConversionError, match="unexpected key 'block9.conv.weight'"):
        torch_to_flax({**state_dict, "block9.conv.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"'head.weight' has shape \[10, 31\]"):
        torch_to_flax({**state_dict, "head.weight": torch.zeros(10, 31)})
    with pytest.raises(ConversionError, match=r"unexpected key 'block1\.\w+\.\w+' in the torch "
                                              r"state_dict for seednet"):
        torch_to_flax(state_dict, "seednet")


def test_flax_side_errors_are_named():
    variables = jax.tree.map(np.asarray, torch_to_flax(Net().state_dict()))
    del variables["params"]["head"]["bias"]
    with pytest.raises(ConversionError, match="missing variable 'params/head/bias'"):
        flax_to_torch(variables)
    variables = jax.tree.map(np.asarray, torch_to_flax(Net().state_dict()))
    variables["params"]["head"]["kernel"] = np.zeros((10, 32))
    with pytest.raises(ConversionError, match=r"'params/head/kernel' has shape \[10, 32\]"):
        flax_to_torch(variables)


def test_nnx_side_errors_are_named():
    variables = random_linen_variables("net")
    variables["batch_stats"]["block4"]["bn"].pop("var")
    with pytest.raises(ConversionError, match="missing variable 'batch_stats/block4/bn/var'"):
        linen_to_nnx(variables, "net")
    variables = random_linen_variables("net")
    variables["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ConversionError, match="unexpected variable 'params/extra/kernel'"):
        linen_to_nnx(variables, "net")
    tinynet = nnx_module("tinynet")
    with pytest.raises(ConversionError, match=r"'(params|batch_stats)/block1/.+' has shape "
                                              r"\[.*8\], net needs \[.*10\]"):
        nnx_to_torch(tinynet, "net")
