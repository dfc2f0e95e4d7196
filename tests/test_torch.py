"""torch_ref: shapes, per-layer counts equal Flax's, the step learns, a short run's workdir, the
rotation, the device. (Its resume: tests/test_faults.py; several ranks: test_distributed.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compare.params import parameter_table
from flax_impl.common.config import Config
from flax_impl.common.data import load_mnist
from flax_impl.common.models import MODELS
from flax_impl.common.workdir import read_metrics
from tests.conftest import SHAPE_BATCH_SIZE, messages, synthetic_mnist
from torch_ref import core as torch_core
from torch_ref import train as torch_train
from torch_ref.augment import rotate
from torch_ref.model import Net, create_model


def test_output_is_log_probabilities_of_shape_b_by_10():
    log_probs = Net().eval()(torch.randn(5, 1, 28, 28))
    assert log_probs.shape == (5, 10)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(5))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_per_layer_parameter_counts_equal_the_flax_models_and_keep_the_budget(model):
    table = parameter_table(model)
    assert table["match"], [row for row in table["rows"] if not row["match"]]
    assert table["torch_total"] < MODELS[model].budget
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
    config = Config(data_source=tiny_idx_source, epochs=2, batch_size=SHAPE_BATCH_SIZE)
    history = torch_train.train(config, tmp_path)
    assert capsys.readouterr().out.count("Test set: Average loss: ") == 2
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert metrics == history and [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[0]) == {"epoch", "train_loss", "test_loss", "test_accuracy", "seconds"}
    assert metrics[-1]["test_accuracy"] > 0.5
    assert json.loads((tmp_path / "config.json").read_text())["framework"] == "torch"
    model = create_model("net")
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "curves.png").is_file()


def test_rotation_by_90_degrees_is_a_counter_clockwise_quarter_turn():
    image = torch.rand(1, 1, 28, 28)
    rotated = rotate(image, torch.tensor([90.0]))
    # (float32's cos(90 degrees) is not 0: each pixel reads 1e-6 of a pixel off)
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
    # At 0 degrees each pixel reads itself, with weights 1 and 0 up to float32's rounding.
    torch.testing.assert_close(rotate(image, torch.tensor([0.0])), image, atol=1e-6, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_error(tiny_idx_source, capsys):
    assert torch_train.main(["--data-source", tiny_idx_source, "--device", "cuda"]) == 2
    assert messages(capsys.readouterr().err) == [
        "error: --device cuda: torch sees no CUDA device here; use --device cpu"]


def test_auto_device_is_cuda_where_torch_sees_a_gpu_and_else_the_cpu_the_run_lives_on(
        tiny_idx_source, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU
    assert torch_train.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # one without
    run = torch_train.create_run(Config(data_source=tiny_idx_source, batch_size=SHAPE_BATCH_SIZE),
                                 load_mnist(tiny_idx_source))
    assert run.device == torch.device("cpu")
    assert {t.device.type for t in (*run.train_data, *run.eval_data)} == {"cpu"}
    assert {p.device.type for p in run.model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_device_runs_on_the_gpu_torch_sees(tiny_idx_source):
    run = torch_train.create_run(Config(data_source=tiny_idx_source, batch_size=SHAPE_BATCH_SIZE),
                                 load_mnist(tiny_idx_source))
    assert {t.device.type for t in (*run.train_data, *run.eval_data)} == {"cuda"}
    assert {p.device.type for p in run.model.parameters()} == {"cuda"}
