"""Training that survives faults: signals, kill -9, NaN, damaged checkpoints, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flax_impl import train as flax_train
from flax_impl.common.workdir import read_metrics
from torch_ref import train as torch_train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def command(source: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flax_impl.train", "--data-source", source, "--epochs", "12",
            "--batch-size", "32", "--steps-per-call", "2", "--workdir", str(workdir), *extra]


def start_and_stop(source: str, workdir: Path, signum: int, argv: list[str] | None = None
                   ) -> subprocess.CompletedProcess:
    """Start a run (`argv`, default the Flax `command`), send `signum` once two epochs have
    finished and the next is under way."""
    process = subprocess.Popen(argv or command(source, workdir), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(read_metrics(workdir / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tiny_idx_source, tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(command(tiny_idx_source, workdir), cwd=ROOT, check=True, capture_output=True)
    return read_metrics(workdir / "metrics.jsonl")


def assert_same_end(resumed: list[dict], straight: list[dict]) -> None:
    assert [m["epoch"] for m in resumed] == [m["epoch"] for m in straight]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[-1][key] == straight[-1][key]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(
        tiny_idx_source, tmp_path, uninterrupted, signum):
    stopped = start_and_stop(tiny_idx_source, tmp_path, signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert "saved a checkpoint at epoch" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    resumed = subprocess.run(command(tiny_idx_source, tmp_path, "--resume"), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    assert_same_end(read_metrics(tmp_path / "metrics.jsonl"), uninterrupted)


def test_kill_9_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tiny_idx_source, tmp_path,
                                                                     uninterrupted):
    killed = start_and_stop(tiny_idx_source, tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(command(tiny_idx_source, tmp_path, "--resume"), cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_end(read_metrics(tmp_path / "metrics.jsonl"), uninterrupted)


def test_nan_loss_stops_at_once_with_one_line(tiny_idx_source, tmp_path, capsys):
    code = flax_train.main(["--data-source", tiny_idx_source, "--epochs", "3", "--lr", "1e8",
                            "--batch-size", "32", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3
    assert "error: the training loss became nan in epoch 1" in err
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # nothing after the last good state


def test_damaged_checkpoint_is_reported_not_loaded(tiny_idx_source, tmp_path, capsys):
    args = ["--data-source", tiny_idx_source, "--epochs", "1", "--batch-size", "64",
            "--workdir", str(tmp_path)]
    assert flax_train.main(args) == 0
    latest = max((tmp_path / "checkpoints").iterdir(), key=lambda p: int(p.name))
    for path in latest.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    capsys.readouterr()
    assert flax_train.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint ") and "is corrupt or partial" in err
    assert len(err.splitlines()) == 1


def test_workdir_of_another_run_is_refused_without_resume_or_overwrite(tiny_idx_source, tmp_path,
                                                                       capsys):
    args = ["--data-source", tiny_idx_source, "--epochs", "1", "--batch-size", "64",
            "--workdir", str(tmp_path)]
    assert flax_train.main(args) == 0
    assert flax_train.main([*args, "--lr", "0.05"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert flax_train.main([*args, "--lr", "0.05", "--resume"]) == 2
    assert "different config (lr)" in capsys.readouterr().err
    assert flax_train.main([*args, "--lr", "0.05", "--overwrite"]) == 0
    # The overwriting run's checkpoint replaced the first run's (same step number).
    overwritten = flax_train.restore_variables(tmp_path)
    assert flax_train.main([*args, "--overwrite"]) == 0
    first_again = flax_train.restore_variables(tmp_path)
    kernel = ("params", "head", "kernel")
    pick = lambda v: v[kernel[0]][kernel[1]][kernel[2]]  # noqa: E731
    assert not np.allclose(pick(overwritten), pick(first_again))


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--warmup-fraction", "1"], "--warmup-fraction must be in (0, 1), got 1.0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--batch-size", "1024"], "--batch-size 1024 is larger than the 512 training images"),
    (["--data-source", "nowhere"], "unknown data source 'nowhere'"),
])
def test_bad_flags_are_one_line_and_exit_2(tiny_idx_source, capsys, flags, message):
    assert flax_train.main(["--data-source", tiny_idx_source, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {err.removeprefix('error: ')}" and message in err
    assert len(err.splitlines()) == 1


def test_unknown_model_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        flax_train.main(["--model", "resnet"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


@pytest.mark.parametrize("train_module", [flax_train, torch_train])
def test_a_workdir_that_is_a_file_is_one_line_error(tiny_idx_source, tmp_path, capsys,
                                                    train_module):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    assert train_module.main(["--data-source", tiny_idx_source, "--workdir", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --workdir {path} is a file; name a directory"


@pytest.mark.parametrize("train_module", [flax_train, torch_train])
def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(tiny_idx_source, tmp_path, capsys,
                                                                train_module):
    args = ["--data-source", tiny_idx_source, "--epochs", "1", "--batch-size", "64",
            "--workdir", str(tmp_path / "new"), "--resume"]
    assert train_module.main(args) == 0
    out = capsys.readouterr().out
    assert "--resume: no checkpoint" in out and "starting a fresh run" in out
    assert len(read_metrics(tmp_path / "new" / "metrics.jsonl")) == 1


def torch_command(source: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch_ref.train", "--data-source", source, "--epochs", "6",
            "--batch-size", "32", "--workdir", str(workdir), *extra]


def test_torch_kill_9_then_resume_ends_like_an_uninterrupted_run(tiny_idx_source, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(torch_command(tiny_idx_source, straight), cwd=ROOT, check=True,
                   capture_output=True)
    killed = start_and_stop(tiny_idx_source, tmp_path / "killed", signal.SIGKILL,
                            torch_command(tiny_idx_source, tmp_path / "killed"))
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(torch_command(tiny_idx_source, tmp_path / "killed", "--resume"),
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    assert_same_end(read_metrics(tmp_path / "killed" / "metrics.jsonl"),
                    read_metrics(straight / "metrics.jsonl"))


class Payload:
    """Not a tensor, dict or number: `weights_only=True` refuses to unpickle it."""


def test_a_torch_checkpoint_that_would_run_code_is_refused(tiny_idx_source, tmp_path, capsys):
    import torch

    args = ["--data-source", tiny_idx_source, "--epochs", "2", "--batch-size", "64",
            "--workdir", str(tmp_path)]
    assert torch_train.main(args) == 0
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "payload": Payload()}, tmp_path / "checkpoint.pt")
    capsys.readouterr()
    assert torch_train.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint ") and "is corrupt or not this run's" in err
    assert len(err.splitlines()) == 1
