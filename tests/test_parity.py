"""Cross-framework regression tests: the compare.parity checks, each must pass (real MNIST)."""

from __future__ import annotations

import pytest
import torch

from compare import parity
from flax_impl.common.data import load_mnist
from torch_ref.model import create_model as create_torch_model

pytestmark = pytest.mark.realdata


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


@pytest.mark.parametrize("model, tolerance", [("net", 1e-5), ("tinynet", 1e-5),
                                              ("widenet", 1e-5), ("seednet", 1e-4)])
def test_eval_outputs_agree_after_conversion_both_ways(mnist, model, tolerance):
    assert_all_pass(parity.check_eval_outputs(mnist, model, tolerance))


@pytest.mark.parametrize("model", ["net", "tinynet"])
def test_train_mode_outputs_running_stats_and_gradients_agree(mnist, model):
    assert_all_pass(parity.check_train_mode(mnist, name=model))


def test_hundred_optimizer_steps_agree_exactly_in_float64(mnist):
    # TinyNet at batch 32: the same train steps as Net's at a fraction of the cost (the command,
    # `python -m compare.parity`, runs Net at the recipe's batch and reports the float32 drift).
    checks = parity.check_optimizer_steps(mnist, float32_drift=False, model="tinynet", batch=32)
    assert_all_pass(checks)
    assert len(checks) == 3  # the loss, the weights and statistics, their moving average


def test_the_nnx_port_agrees_with_torch(mnist):
    # Checks 1-3 with the NNX network in Flax's place (TinyNet at batch 32, as above).
    checks = (parity.check_nnx_eval_outputs(mnist, "net", 1e-5)
              + parity.check_train_mode(mnist, name="tinynet", api="nnx")
              + parity.check_optimizer_steps(mnist, float32_drift=False, model="tinynet",
                                             batch=32, api="nnx"))
    assert_all_pass(checks)
    assert len(checks) == 9 and all("NNX" in check.name for check in checks)


def test_learning_rate_schedule_agrees_at_every_step():
    assert_all_pass(parity.check_schedule())


def test_rotation_agrees_for_the_same_angles(mnist):
    assert_all_pass(parity.check_rotation(mnist))


def test_trained_model_scores_the_same_in_the_other_framework(mnist):
    assert_all_pass(parity.check_trained_models(mnist, steps=50))


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
def test_parity_cli_names_a_file_that_is_no_torch_model(mnist, tmp_path, capsys, content):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    assert parity.main(["--torch-model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot use {bad}") and len(err.splitlines()) == 1


def test_loss_with_and_without_label_smoothing_agrees(mnist):
    checks = parity.check_loss(mnist)
    assert len(checks) == 2
    assert_all_pass(checks)
