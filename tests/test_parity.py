"""Cross-framework regression tests: the compare.parity checks, each must pass (real MNIST), and
the command's choices and errors."""

from __future__ import annotations

import pytest
import torch

from compare import parity
from flax_impl.common.data import load_mnist
from torch_ref.model import create_model as create_torch_model

realdata = pytest.mark.realdata


@pytest.fixture(scope="module")
def mnist(monkeypatch_module):
    return load_mnist()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST20K_CACHE", raising=False)  # the user's real cache
        yield patch


def assert_all_pass(checks):
    failed = [f"{c.name}: {c.error:.3g} > {c.tolerance:g}" for c in checks if not c.passed]
    assert not failed, failed


@realdata
@pytest.mark.parametrize("model, tolerance, batch", [
    ("net", 1e-5, parity.BATCH), ("tinynet", 1e-5, parity.BATCH),
    ("widenet", 1e-5, parity.BATCH), ("sepnet", 1e-5, parity.BATCH),
    ("xsepnet", 1e-5, parity.BATCH), ("seednet", 1e-4, 32)])  # SeedNet: 6.4M parameters
def test_eval_outputs_agree_after_conversion_both_ways(mnist, model, tolerance, batch):
    assert_all_pass(parity.check_eval_outputs(mnist, model, tolerance, batch=batch))


@realdata
def test_train_mode_outputs_running_stats_and_gradients_agree(mnist):
    # Net in linen; TinyNet's narrow layers in NNX below (NNX = linen exactly, also below).
    checks = parity.check_train_mode(mnist, name="net")
    assert_all_pass(checks)
    float64 = next(c for c in checks if "float64" in c.name)
    assert float64.tolerance < 1e-8  # float64's own rounding: a float32 operation would fail it


@realdata
def test_sgd_steps_agree_in_float64_but_for_the_inputs_float32_rounding(mnist):
    # TinyNet, 50 steps of 32 images (the whole one-cycle schedule: it spans the run): the same
    # train steps as Net's at a fraction of the cost, torch's float64 steps being slow on the CPU
    # (the command, `python -m compare.parity`, runs Net, 100 steps at the recipe's batch, and
    # reports the float32 drift).
    checks = parity.check_optimizer_steps(mnist, steps=50, float32_drift=False, model="tinynet",
                                          batch=32)
    assert [c.name for c in checks] == [
        "50 SGD steps, tinynet, float64: loss, max |difference|",
        "50 SGD steps, tinynet, float64: weights and stats (relative)"]
    assert_all_pass(checks)


@realdata
def test_the_depthwise_and_1x1_blocks_train_alike(mnist):
    # SepNet: depthwise convolutions (Flax's feature_group_count, torch's groups) and 1x1 ones,
    # outputs, statistics and gradients (float64 and float32), then SGD steps in float64. Its
    # thirteen BatchNorms at batch 32 amplify the inputs' float32 rounding (Flax's step) about
    # 1.7 times a step: float64 proves 5 steps to 5e-7, not 50 (10 steps: 1.6e-6).
    checks = (parity.check_train_mode(mnist, name="sepnet")
              + parity.check_optimizer_steps(mnist, steps=5, float32_drift=False,
                                             model="sepnet", batch=32))
    assert len(checks) == 6
    assert_all_pass(checks)
    assert_all_pass(parity.check_train_mode(mnist, name="xsepnet"))  # bare depthwise convs


@realdata
def test_the_nnx_port_agrees_with_linen(mnist):
    # Outputs, statistics, gradients, and ten train steps of each API's own step (the command:
    # Net and TinyNet, 30 steps).
    for name in ("tinynet", "sepnet", "xsepnet"):
        checks = parity.check_nnx_against_linen(mnist, name, steps=10)
        assert len(checks) == 5 and all(f"{name} (NNX)" in check.name for check in checks)
        assert_all_pass(checks)


@realdata
def test_the_nnx_port_agrees_with_torch(mnist):
    # Checks 1 and 2 with the NNX network in Flax's place; its train steps equal linen's (above),
    # whose equal torch's (`python -m compare.parity` also runs check 3 in NNX).
    checks = (parity.check_nnx_eval_outputs(mnist, "net", 1e-5)
              + parity.check_train_mode(mnist, name="tinynet", api="nnx"))
    assert len(checks) == 6 and all("NNX" in check.name for check in checks)
    assert_all_pass(checks)


def test_learning_rate_schedule_agrees_at_every_step():
    assert_all_pass(parity.check_schedule())


@realdata
def test_rotation_agrees_for_the_same_angles(mnist):
    assert_all_pass(parity.check_rotation(mnist))


@realdata
def test_a_saved_torch_model_scores_the_same_in_flax(mnist, tmp_path):
    torch.manual_seed(0)
    model = create_torch_model("net", dropout=0.0)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    checks = parity.check_saved_torch_model(mnist, str(tmp_path / "model.pt"))
    assert len(checks) == 1
    assert_all_pass(checks)


@pytest.mark.parametrize("content", [b"not a state_dict", b""])
def test_parity_cli_names_a_file_that_is_no_torch_model_before_loading_data(tmp_path, capsys,
                                                                            content):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    assert parity.main(["--torch-model", str(bad), "--data-source", "idx:/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot use {bad}") and len(err.splitlines()) == 1


def test_parity_cli_runs_the_checks_chosen_and_refuses_others(tiny_idx_source, capsys):
    assert parity.main(["--checks", "5", "--data-source", tiny_idx_source]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split(",")[0] for row in rows[2:4]] == ["rotation"] * 2
    assert rows[-1] == "2 passed, 0 failed"
    with pytest.raises(SystemExit):
        parity.main(["--checks", "5,8"])
    assert "--checks takes numbers from 1 to 7" in capsys.readouterr().err


@realdata
def test_loss_with_and_without_label_smoothing_agrees(mnist):
    checks = parity.check_loss(mnist)
    assert len(checks) == 2
    assert_all_pass(checks)
