"""compare.convert: lossless round trips and one clear error per bad key or shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from compare.convert import ConversionError, flax_to_torch, torch_to_flax
from torch_ref.model import Net, create_model


@pytest.mark.parametrize("name", ["net", "tinynet", "widenet", "seednet"])
def test_torch_to_flax_to_torch_is_lossless(name):
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 2.0)
    original = model.state_dict()
    back = flax_to_torch(torch_to_flax(original, name), name)
    assert back.keys() == original.keys()
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    create_model(name).load_state_dict(back)  # strict


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
    with pytest.raises(ConversionError, match="unexpected key"):
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
