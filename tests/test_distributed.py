"""Training on several processes: jax.distributed for Flax, torch.distributed (DDP) for torch.

Two local processes against one: the same global batch gives the same run. Faults: a process
that dies stops the others with one line; bad launch settings are one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flax_impl import train as flax_train
from flax_impl.common.config import recipe_config
from flax_impl.common.workdir import read_metrics
from tests.conftest import FLAX_SHAPE, child_env, synthetic_mnist
from torch_ref import train as torch_train
from torch_ref.augment import random_rotate
from torch_ref.distributed import GlobalBatchNorm2d, Group
from torch_ref.setup import setup_training

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds a multi-process run may take here before the test fails


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def flax_processes(flags: list[str], count: int = 2) -> list[subprocess.Popen]:
    """`count` processes of `python -m flax_impl.train` joined by jax.distributed."""
    address = f"127.0.0.1:{free_port()}"
    return [start(["-m", "flax_impl.train", *flags, "--coordinator-address", address,
                   "--num-processes", str(count), "--process-id", str(index),
                   "--distributed-timeout", "60"]) for index in range(count)]


def torch_ranks(flags: list[str], count: int = 2) -> list[subprocess.Popen]:
    """`count` ranks of `python -m torch_ref.train`, launched as torchrun would."""
    port = str(free_port())
    return [start(["-m", "torch_ref.train", *flags, "--distributed-timeout", "60"],
                  env={"RANK": str(rank), "WORLD_SIZE": str(count), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in range(count)]


def finish_all(processes: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    results = [finish(process) for process in processes]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def assert_close(runs: list[list[dict]], rtol: float) -> None:
    first, *others = runs
    for other in others:
        assert [m["epoch"] for m in other] == [m["epoch"] for m in first]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            np.testing.assert_allclose([m[key] for m in other], [m[key] for m in first],
                                       rtol=rtol, err_msg=key)


def after_first_epoch(processes: list[subprocess.Popen], workdir: Path) -> None:
    """Return once the run in `workdir` has recorded an epoch."""
    deadline = time.monotonic() + TIMEOUT
    while not read_metrics(workdir / "metrics.jsonl"):
        for process in processes:
            assert process.poll() is None, finish(process).stderr[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def kill_one_and_watch_the_other(processes: list[subprocess.Popen], workdir: Path
                                 ) -> tuple[subprocess.CompletedProcess, float]:
    """Once the run has finished an epoch, kill -9 the second process; the first's result and
    how many seconds it took to stop."""
    first, second = processes
    after_first_epoch(processes, workdir)
    second.kill()
    killed = time.monotonic()
    result = finish(first, timeout=120)
    finish(second)
    return result, time.monotonic() - killed


def assert_stopped_with_one_line(result: subprocess.CompletedProcess, seconds: float,
                                 message: str) -> None:
    assert result.returncode == 4, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr
    assert seconds < 60


# Flax: jax.distributed

# The suite's run shape: one compiled chunk per run, shared with the other tests' runs.
FLAX_RUN = ["--epochs", "2", *FLAX_SHAPE]


@pytest.mark.slow
def test_flax_two_processes_train_as_one_process_and_resume(tiny_idx_source, tmp_path):
    flags = [*FLAX_RUN, "--data-source", tiny_idx_source]
    # The two processes run the NNX network; the runs they are compared with, linen's.
    two = finish_all(flax_processes([*flags, "--api", "nnx", "--workdir", str(tmp_path / "two")]))
    assert "Test set" in two[0].stdout and "Flax (NNX) on 2 cpu device(s) in 2 processes" in \
        two[0].stdout
    assert "Flax on" not in two[1].stdout and "Test set" not in two[1].stdout  # process 0 logs
    assert "Epoch" not in two[1].stderr
    two_devices = finish(start(["-m", "flax_impl.train", *flags, "--workdir",
                                str(tmp_path / "devices")],
                               env=child_env(2)))  # the suite's XLA_FLAGS kept: same level
    assert two_devices.returncode == 0, two_devices.stderr[-3000:]
    assert flax_train.main([*flags, "--workdir", str(tmp_path / "one")]) == 0  # this process
    runs = {name: read_metrics(tmp_path / name / "metrics.jsonl")
            for name in ("two", "devices", "one")}
    # Two processes of one device each run the program one process runs on two devices (and
    # NNX's program is linen's).
    assert_close([runs["two"], runs["devices"]], rtol=1e-6)
    # One device sums the global batch's BatchNorm statistics and gradients in another order.
    assert_close([runs["one"], runs["two"], runs["devices"]], rtol=2e-3)

    # Resume: the checkpoint of the last epoch lost, both processes redo it from the previous.
    checkpoints = sorted((tmp_path / "two" / "checkpoints").iterdir(), key=lambda p: int(p.name))
    shutil.rmtree(checkpoints[-1])
    resumed = finish_all(flax_processes([*flags, "--api", "nnx", "--workdir",
                                         str(tmp_path / "two"), "--resume"]))
    assert "Resumed from" in resumed[0].stdout and "epoch 2, step 0" in resumed[0].stdout
    def timeless(history):
        return [{k: v for k, v in record.items() if k != "seconds"} for record in history]

    assert timeless(read_metrics(tmp_path / "two" / "metrics.jsonl")) == timeless(runs["two"])


@pytest.mark.slow
def test_flax_sigterm_to_one_process_stops_all_at_one_checkpoint(tiny_idx_source, tmp_path):
    flags = [*FLAX_RUN, "--epochs", "4", "--data-source", tiny_idx_source, "--workdir",
             str(tmp_path)]
    processes = flax_processes(flags)
    after_first_epoch(processes, tmp_path)
    processes[1].send_signal(signal.SIGTERM)
    stopped = [finish(process) for process in processes]
    for result in stopped:  # both agree to stop at the same chunk: a checkpoint of both
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
        assert "SIGTERM: stopped; saved a checkpoint at epoch" in result.stderr
    done = len(read_metrics(tmp_path / "metrics.jsonl"))
    assert 1 <= done < 4
    resumed = finish_all(flax_processes([*flags, "--resume"]))
    assert "Resumed from" in resumed[0].stdout
    assert [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 5))


@pytest.mark.slow
def test_flax_a_process_that_dies_stops_the_other_with_one_line(tiny_idx_source, tmp_path):
    processes = flax_processes([*FLAX_RUN, "--epochs", "500", "--data-source", tiny_idx_source,
                                "--workdir", str(tmp_path)])
    assert_stopped_with_one_line(*kill_one_and_watch_the_other(processes, tmp_path),
                                 "process 0 of 2: a collective failed")


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "1"],
     "must be HOST:PORT"),
    (["--num-processes", "0"], "--num-processes must be > 0"),
    (["--distributed", "--distributed-timeout", "0"], "--distributed-timeout must be > 0"),
])
def test_flax_bad_process_flags_say_what_is_wrong(flags, message, capsys):
    assert flax_train.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.slow
def test_flax_unreachable_coordinator_or_no_cluster_is_one_line():
    unreachable = finish(start(["-m", "flax_impl.train", "--coordinator-address",
                                f"127.0.0.1:{free_port()}", "--num-processes", "2",
                                "--process-id", "1", "--distributed-timeout", "2"]), timeout=60)
    assert unreachable.returncode == 2
    assert unreachable.stderr.startswith("error: cannot reach the coordinator at 127.0.0.1:")
    assert unreachable.stderr.count("\n") == 1
    clusterless = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    alone = subprocess.run([sys.executable, "-m", "flax_impl.train", "--distributed"], cwd=ROOT,
                           capture_output=True, text=True, env=clusterless, timeout=120)
    assert alone.returncode == 2 and "found no cluster to join" in alone.stderr
    assert alone.stderr.count("\n") == 1


# torch: torch.distributed, DDP and global-batch BatchNorm

def in_two_ranks(function, *args) -> None:
    """Run `function(rank, *args)` in 2 spawned processes joined by a gloo group."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(join_and_run, args=(f"{directory}/store", function, args), nprocs=2)


def join_and_run(rank: int, store: str, function, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        function(rank, *args)
    finally:
        dist.destroy_process_group()


def global_batchnorm_matches_batchnorm(rank: int) -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + 1
    weights = torch.randn(8, 3, 5, 5, dtype=torch.float64)  # the loss: sum(weights * output)
    reference = nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    ours = GlobalBatchNorm2d.convert(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3).double()))[0]
    ours.load_state_dict(reference.state_dict())
    assert type(ours) is GlobalBatchNorm2d
    full = images.clone().requires_grad_()
    (reference(full) * weights).sum().backward()
    rows = Group(rank, 2).rows(8)
    share = images[rows].clone().requires_grad_()
    output = ours(share)
    (output * weights[rows]).sum().backward()
    with torch.no_grad():
        expected = nn.functional.batch_norm(images, None, None, reference.weight,
                                            reference.bias, training=True)[rows]
    torch.testing.assert_close(output.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(share.grad, full.grad[rows], rtol=1e-12, atol=1e-12)
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad.clone()
        dist.all_reduce(grad)  # what DDP does (as a mean: each rank's loss is its share's)
        torch.testing.assert_close(grad, getattr(reference, name).grad, rtol=1e-12, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), rtol=1e-12,
                                   atol=1e-12)
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(images), reference(images), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_global_batchnorm_over_two_processes_is_batchnorm_over_the_whole_batch():
    in_two_ranks(global_batchnorm_matches_batchnorm)


TORCH_STEPS_CONFIG = recipe_config(batch_size=64, epochs=1, dropout=0.0)  # rotation on


def train_steps_in_float64(group: Group, steps: int = 6) -> dict[str, torch.Tensor]:
    torch.set_default_dtype(torch.float64)
    try:
        run = setup_training(TORCH_STEPS_CONFIG, synthetic_mnist(512, 200), "cpu", group)
        order = run.plan()
        for step in range(steps):
            run.run_step(order, step)
        return {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    finally:
        torch.set_default_dtype(torch.float32)


def save_rank0_weights(rank: int, path: str) -> None:
    weights = train_steps_in_float64(Group(rank, 2))
    if rank == 0:
        torch.save(weights, path)


@pytest.mark.slow
def test_torch_two_ranks_take_the_steps_of_one_process(tmp_path):
    """In float64 (float32's rounding differences grow step by step), rotation on: DDP, the
    global BatchNorm, each rank's share of the batch and of the rotation angles."""
    in_two_ranks(save_rank0_weights, str(tmp_path / "two.pt"))
    two, one = torch.load(tmp_path / "two.pt"), train_steps_in_float64(Group())
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.slow
def test_torchrun_two_ranks_end_with_the_metrics_of_one_process(tiny_idx_source, tmp_path):
    flags = ["--epochs", "2", "--batch-size", "64", "--dropout", "0", "--max-rotation", "0",
             "--data-source", tiny_idx_source, "--device", "cpu"]
    launched = finish(start(["-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "torch_ref.train", *flags,
                             "--workdir", str(tmp_path / "two")]))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("Test set") == 2  # rank 0 alone prints
    one = finish(start(["-m", "torch_ref.train", *flags, "--workdir", str(tmp_path / "one")]))
    assert one.returncode == 0, one.stderr[-3000:]
    assert_close([read_metrics(tmp_path / name / "metrics.jsonl") for name in ("two", "one")],
                 rtol=2e-3)
    saved = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert not any(name.startswith("module.") for name in saved)  # the model, not DDP's wrapper


@pytest.mark.slow
def test_torch_a_rank_that_dies_stops_the_other_with_one_line(tiny_idx_source, tmp_path):
    ranks = torch_ranks(["--epochs", "500", "--batch-size", "64", "--device", "cpu",
                         "--data-source", tiny_idx_source, "--workdir", str(tmp_path)])
    assert_stopped_with_one_line(*kill_one_and_watch_the_other(ranks, tmp_path),
                                 "rank 0 of 2: a collective failed")


@pytest.mark.parametrize("environment, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..1"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "must be integers"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT unset"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},
     "cannot reach rank 0 at 127.0.0.1:0 within 1 s"),
])
def test_torch_bad_launch_settings_are_one_line(environment, message, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert torch_train.main(["--device", "cpu", "--distributed-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_rank_rows_split_a_batch_and_random_rotate_keeps_each_ranks_angles():
    assert [Group(rank, 3).rows(10) for rank in range(3)] == [slice(0, 3), slice(3, 6),
                                                             slice(6, 10)]
    images = torch.rand(8, 1, 28, 28)
    whole = random_rotate(images, 7.0, torch.Generator().manual_seed(0))
    parts = [random_rotate(images[rows], 7.0, torch.Generator().manual_seed(0), (rank, 2))
             for rank, rows in enumerate((slice(0, 4), slice(4, 8)))]
    torch.testing.assert_close(torch.cat(parts), whole)
    assert not torch.equal(parts[0], random_rotate(images[:4], 7.0,
                                                   torch.Generator().manual_seed(0), (1, 2)))
