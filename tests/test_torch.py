"""torch_ref: shapes, per-layer counts equal Flax's, the step learns, short runs, rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compare.params import parameter_table
from flax_impl.common.config import Config
from flax_impl.common.workdir import read_metrics
from tests.conftest import crash_in_epoch, synthetic_mnist
from torch_ref import core as torch_core
from torch_ref import train as torch_train
from torch_ref.augment import rotate
from torch_ref.model import Net, SeedNet, create_model


@pytest.mark.parametrize("model_class", [Net, SeedNet])
def test_output_is_log_probabilities_of_shape_b_by_10(model_class):
    log_probs = model_class().eval()(torch.randn(5, 1, 28, 28))
    assert log_probs.shape == (5, 10)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(5))


@pytest.mark.parametrize("model", ["net", "tinynet", "widenet", "seednet"])
def test_per_layer_parameter_counts_equal_the_flax_models(model):
    table = parameter_table(model)
    assert table["match"], [row for row in table["rows"] if not row["match"]]
    assert table["ok"]  # and under its budget, if it has one
    assert table["torch_total"] == sum(p.numel() for p in create_model(model).parameters())


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    config = Config(max_rotation=0.0, dropout=0.0, epochs=1)
    model = Net(dropout=0.0)
    optimizer, scheduler = torch_core.create_optimizer(model, config, total_steps=15)
    data = synthetic_mnist(64, 1)
    images, labels = torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels).long()
    generator = torch.Generator().manual_seed(0)
    losses = [torch_core.train_step(model, optimizer, scheduler, images, labels, config,
                                    generator).item() for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


def test_short_run_writes_its_workdir(tiny_idx_source, tmp_path, capsys):
    config = Config(data_source=tiny_idx_source, epochs=2, batch_size=64, eval_batch_size=100)
    history = torch_train.train(config, tmp_path)
    assert capsys.readouterr().out.count("Test set: Average loss: ") == 2
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert metrics[-1]["test_accuracy"] == history[-1]["test_accuracy"] > 0.5
    assert json.loads((tmp_path / "config.json").read_text())["framework"] == "torch"
    state_dict = torch.load(tmp_path / "model.pt")
    Net().load_state_dict(state_dict)


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(tiny_idx_source, tmp_path, monkeypatch):
    config = Config(data_source=tiny_idx_source, epochs=3, batch_size=64, eval_batch_size=100)
    straight = torch_train.train(config, tmp_path / "straight")
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, torch_train, 3)
        with pytest.raises(KeyboardInterrupt):
            torch_train.train(config, tmp_path / "interrupted")
    torch.manual_seed(1234)  # the global RNG must come back from the checkpoint, not from here
    resumed = torch_train.train(config, tmp_path / "interrupted", resume=True)
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[-1][key] == straight[-1][key]


def test_rotation_by_90_degrees_is_a_counter_clockwise_quarter_turn():
    image = torch.rand(1, 1, 28, 28)
    rotated = rotate(image, torch.tensor([90.0]))
    np.testing.assert_allclose(rotated[0, 0].numpy(), np.rot90(image[0, 0].numpy()), atol=1e-5)


def test_rotation_by_a_small_angle_moves_a_point_where_geometry_says():
    image = torch.zeros(1, 1, 29, 29)
    image[0, 0, 14, 24] = 1.0  # 10 pixels right of the centre (14, 14)
    rotated = rotate(image, torch.tensor([30.0]))[0, 0]
    rows, cols = torch.meshgrid(torch.arange(29.0), torch.arange(29.0), indexing="ij")
    mass = rotated.sum()
    centre = ((rows * rotated).sum() / mass, (cols * rotated).sum() / mass)
    # Counter-clockwise on screen (rows grow downwards): up and to the left.
    expected = (14 - 10 * np.sin(np.pi / 6), 14 + 10 * np.cos(np.pi / 6))
    # (bilinear resampling of a single pixel moves its centre of mass by a few hundredths)
    np.testing.assert_allclose([float(c) for c in centre], expected, atol=0.15)
    torch.testing.assert_close(rotate(image, torch.tensor([0.0])), image, atol=1e-6, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_error(tiny_idx_source, capsys):
    assert torch_train.main(["--data-source", tiny_idx_source, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device cuda: torch sees no CUDA device here; use --device cpu"


def test_auto_device_is_the_cpu_here_and_the_run_lives_on_it(tiny_idx_source, capsys):
    from flax_impl.common.data import load_mnist
    from torch_ref.setup import setup_training

    run = setup_training(Config(data_source=tiny_idx_source), load_mnist(tiny_idx_source))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.device.type == expected
    assert {t.device.type for t in (*run.train_data, *run.eval_data)} == {expected}
    assert {p.device.type for p in run.model.parameters()} == {expected}
