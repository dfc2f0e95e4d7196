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
from tests.conftest import FLAX_SHAPE, SHAPE_BATCH_SIZE
from torch_ref import train as torch_train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def shape_flags(flax: bool) -> list[str]:
    """The suite's run shape (`FLAX_SHAPE`) on a Flax or a torch command line (torch has no
    --steps-per-call)."""
    return list(FLAX_SHAPE) if flax else ["--batch-size", str(SHAPE_BATCH_SIZE)]


def run_args(module, source: str, workdir: Path, *extra: str) -> list[str]:
    """The flags of a one-epoch run of `module` in the suite's shape."""
    return ["--data-source", source, "--epochs", "1", *shape_flags(module is flax_train),
            "--workdir", str(workdir), *extra]


def command(source: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flax_impl.train", "--data-source", source, "--epochs", "6",
            *FLAX_SHAPE, "--workdir", str(workdir), *extra]


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
    args = run_args(flax_train, tiny_idx_source, tmp_path)
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
    args = run_args(flax_train, tiny_idx_source, tmp_path)
    assert flax_train.main(args) == 0
    # Another seed: another run whose steps compile to the same program as the first's.
    assert flax_train.main([*args, "--seed", "1"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert flax_train.main([*args, "--seed", "1", "--resume"]) == 2
    assert "different config (seed)" in capsys.readouterr().err
    assert flax_train.main([*args, "--seed", "1", "--overwrite"]) == 0
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
    args = run_args(train_module, tiny_idx_source, tmp_path / "new", "--resume")
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


def test_an_exploded_loss_counts_as_diverged_and_a_healthy_one_does_not():
    from flax_impl.common.errors import exploded

    assert exploded(float("nan"), 2.3) and exploded(float("inf"), 2.3)
    assert exploded(5.6e24, 2.3) and exploded(300.0, 2.3)
    assert not exploded(2.5, 2.3) and not exploded(0.01, 2.3) and not exploded(50.0, 2.3)


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_a_loss_that_explodes_without_nan_stops_with_one_line(tiny_idx_source, tmp_path, capsys,
                                                               framework):
    module = flax_train if framework == "flax" else torch_train
    # At this rate the loss grows past 1e20 and stays finite: NaN alone would miss it.
    code = module.main(["--data-source", tiny_idx_source, "--epochs", "2", "--lr", "1e6",
                        "--workdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert "error: the training loss became" in err[-1] and "in epoch 1" in err[-1]
    assert "nan" not in err[-1] and "inf" not in err[-1]
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # nothing after the last good state


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("degrees", ["1000", "-1", "180.5"])
def test_max_rotation_beyond_a_half_turn_is_refused(framework, degrees, capsys):
    module = flax_train if framework == "flax" else torch_train
    assert module.main(["--max-rotation", degrees]) == 2
    assert "--max-rotation must be in [0, 180] degrees" in capsys.readouterr().err


# Workdirs that defend themselves.

def listing(workdir: Path) -> dict[str, bytes]:
    """Every file under `workdir` and its bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}


def test_a_busy_workdir_refuses_a_second_run_until_the_first_is_killed(tiny_idx_source,
                                                                       tmp_path, capsys):
    first = subprocess.Popen(command(tiny_idx_source, tmp_path, "--epochs", "500"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(tmp_path / "metrics.jsonl") and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        for module in (flax_train, torch_train):  # one lock for both frameworks
            assert module.main(run_args(module, tiny_idx_source, tmp_path, "--overwrite")) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"error: {tmp_path} is in use by another run; wait for it to end or " \
                          f"choose another --workdir"
    finally:
        first.kill()
        first.communicate()
    # The killed run's lock died with it: the next run needs no clean-up.
    assert torch_train.main(run_args(torch_train, tiny_idx_source, tmp_path, "--overwrite")) == 0


def test_a_missing_config_beside_checkpoints_is_an_error_not_a_fresh_start(tiny_idx_source,
                                                                         tmp_path, capsys):
    assert flax_train.main(run_args(flax_train, tiny_idx_source, tmp_path)) == 0
    (tmp_path / "config.json").unlink()
    kept = listing(tmp_path)
    capsys.readouterr()
    for extra in ((), ("--resume",)):
        assert flax_train.main(run_args(flax_train, tiny_idx_source, tmp_path, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert "holds a run's files (metrics.jsonl, curves.png, checkpoints) but no config.json" \
            in err and len(err.splitlines()) == 1
    assert listing(tmp_path) == kept  # nothing deleted


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_overwrite_keeps_the_old_run_until_the_new_ones_data_and_flags_are_checked(
        framework, tiny_idx_source, tmp_path, capsys):
    from tests.conftest import idx_bytes

    module = flax_train if framework == "flax" else torch_train
    workdir = tmp_path / "run"
    assert module.main(run_args(module, tiny_idx_source, workdir)) == 0
    kept = listing(workdir)
    wrong_size = tmp_path / "idx32"
    wrong_size.mkdir()
    for stem, array in (("train-images-idx3-ubyte", np.zeros((64, 32, 32))),
                        ("train-labels-idx1-ubyte", np.zeros(64)),
                        ("t10k-images-idx3-ubyte", np.zeros((16, 32, 32))),
                        ("t10k-labels-idx1-ubyte", np.zeros(16))):
        (wrong_size / stem).write_bytes(idx_bytes(array))
    capsys.readouterr()
    assert module.main([*run_args(module, f"idx:{wrong_size}", workdir, "--overwrite")]) == 2
    assert "expected uint8[N, 28, 28]" in capsys.readouterr().err
    assert module.main([*run_args(module, tiny_idx_source, workdir, "--overwrite"),
                        "--batch-size", "100000"]) == 2
    assert listing(workdir) == kept  # the old run, whole
    # A fresh workdir that fails its checks is left as it was: not there, nothing to block.
    fresh = tmp_path / "fresh"
    assert module.main([*run_args(module, tiny_idx_source, fresh), "--batch-size", "100000"]) == 2
    assert not fresh.exists()
    assert module.main(run_args(module, tiny_idx_source, fresh)) == 0


def test_a_fresh_torch_run_leaves_no_earlier_model_pt(tiny_idx_source, tmp_path, monkeypatch):
    from tests.conftest import crash_in_epoch

    assert torch_train.main(run_args(torch_train, tiny_idx_source, tmp_path)) == 0
    assert (tmp_path / "model.pt").exists()
    args = run_args(torch_train, tiny_idx_source, tmp_path)
    config = torch_train.config_from_args(torch_train.build_parser("t", "").parse_args(args))
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, torch_train, 1)
        with pytest.raises(KeyboardInterrupt):
            torch_train.train(config, tmp_path, overwrite=True)
    assert not (tmp_path / "model.pt").exists()  # evaluate cannot score the earlier run


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_run(framework, tiny_idx_source,
                                                               tmp_path, capsys):
    import json
    import shutil

    module = flax_train if framework == "flax" else torch_train
    longer, shorter = tmp_path / "longer", tmp_path / "shorter"
    assert module.main([*run_args(module, tiny_idx_source, longer), "--epochs", "2"]) == 0
    assert module.main(run_args(module, tiny_idx_source, shorter)) == 0
    name = "checkpoints" if framework == "flax" else "checkpoint.pt"
    # The longer run's checkpoint under the shorter run's config (as if two runs had mixed).
    if framework == "flax":
        shutil.rmtree(shorter / name)
        shutil.copytree(longer / name, shorter / name)
    else:
        shutil.copy(longer / name, shorter / name)
    assert json.loads((shorter / "config.json").read_text())["epochs"] == 1
    capsys.readouterr()
    assert module.main(run_args(module, tiny_idx_source, shorter, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: ") and "--overwrite to start afresh" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a string"', b"\xff\xfe not utf-8"])
def test_a_config_json_that_is_no_object_is_one_line(tiny_idx_source, tmp_path, capsys, content):
    (tmp_path / "config.json").write_bytes(content)
    assert flax_train.main(run_args(flax_train, tiny_idx_source, tmp_path, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json is not a training config (a JSON object)" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_a_workdir_that_cannot_be_created_is_one_line(framework, where, tiny_idx_source,
                                                      tmp_path, capsys):
    module = flax_train if framework == "flax" else torch_train
    (tmp_path / "a_file").write_text("")
    workdir = tmp_path / "a_file" / "run" if where == "under_a_file" else Path("/proc/mnist20k")
    assert module.main(run_args(module, tiny_idx_source, workdir)) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot create it" in err and len(err.splitlines()) == 1


@pytest.fixture
def small_filesystem(tmp_path, request):
    """A filesystem of `request.param` (e.g. "600k"): room for a run's first epochs only (a
    tmpfs; mounting one needs root, else the test is skipped)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


# Sizes that fill up after a few epochs: Orbax keeps two checkpoints, torch one.
@pytest.mark.parametrize("module, small_filesystem", [("flax_impl.train", "600k"),
                                                      ("torch_ref.train", "300k")],
                         indirect=["small_filesystem"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(small_filesystem, module,
                                                                 tiny_idx_source):
    workdir = small_filesystem / "run"
    argv = [sys.executable, "-m", module, "--data-source", tiny_idx_source, "--epochs", "12",
            *shape_flags(module == "flax_impl.train"), "--workdir", str(workdir)]
    full = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr[-2000:]
    errors = [line for line in full.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "free some space, then --resume" in errors[0]
    assert "Traceback" not in full.stderr
    done = len(read_metrics(workdir / "metrics.jsonl"))
    assert 1 <= done < 12
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    resumed = subprocess.run([*argv, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["epoch"] for m in read_metrics(workdir / "metrics.jsonl")] == list(range(1, 13))


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resuming_a_finished_run_restores_a_truncated_metrics_file(framework, tiny_idx_source,
                                                                   tmp_path):
    module = flax_train if framework == "flax" else torch_train
    args = [*run_args(module, tiny_idx_source, tmp_path), "--epochs", "2"]
    assert module.main(args) == 0
    whole = read_metrics(tmp_path / "metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # cut mid-line
    assert module.main([*args, "--resume"]) == 0
    assert read_metrics(tmp_path / "metrics.jsonl") == whole


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_a_seed_out_of_range_is_one_line(framework, seed, capsys):
    module = flax_train if framework == "flax" else torch_train
    assert module.main(["--seed", seed]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --seed must be in [0, 2**32), got {seed}"


def test_an_idx_dataset_without_test_images_is_refused_before_training(tmp_path, capsys):
    from tests.conftest import synthetic_mnist, write_idx_dir

    mnist = synthetic_mnist(64, 1)
    empty_test = mnist._replace(test_images=mnist.test_images[:0], test_labels=mnist.test_labels[:0])
    source = f"idx:{write_idx_dir(tmp_path / 'idx', empty_test)}"
    assert flax_train.main(["--data-source", source, "--epochs", "1", "--batch-size", "32"]) == 2
    assert "no test images" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_ctrl_c_outside_a_checkpointed_chunk_is_one_line(framework, tiny_idx_source, tmp_path,
                                                         monkeypatch, capsys):
    from tests.conftest import crash_in_epoch

    module = flax_train if framework == "flax" else torch_train

    def interrupted(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "load_mnist", interrupted)  # Ctrl-C while MNIST loads
    assert module.main(run_args(module, tiny_idx_source, tmp_path / "startup")) == 130
    monkeypatch.undo()
    if framework == "torch":  # Ctrl-C in torch's training loop: its last checkpoint stays
        crash_in_epoch(monkeypatch, torch_train, 2)
        args = run_args(torch_train, tiny_idx_source, tmp_path / "run", "--epochs", "3")
        assert torch_train.main(args) == 130
        assert (tmp_path / "run" / "checkpoint.pt").exists()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("SIGINT")]
    assert len(lines) == (2 if framework == "torch" else 1) and "Traceback" not in err
    assert "continue with --resume" in lines[0]


def test_evaluate_out_naming_a_file_is_refused_before_scoring(tmp_path, capsys):
    from flax_impl import evaluate

    (tmp_path / "taken").write_text("")
    assert evaluate.main(["--workdir", str(tmp_path / "none"), "--out",
                          str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {tmp_path / 'taken'} is a file; name a directory for the pictures"


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_refuses_a_checkpoint_of_other_shapes(framework, tiny_idx_source, tmp_path,
                                                     capsys):
    import shutil

    module = flax_train if framework == "flax" else torch_train
    narrow, wide = tmp_path / "narrow", tmp_path / "wide"
    assert module.main([*run_args(module, tiny_idx_source, narrow), "--model", "tinynet"]) == 0
    assert module.main(run_args(module, tiny_idx_source, wide)) == 0
    if framework == "flax":  # TinyNet's checkpoint under Net's config
        shutil.rmtree(wide / "checkpoints")
        shutil.copytree(narrow / "checkpoints", wide / "checkpoints")
    else:
        shutil.copy(narrow / "checkpoint.pt", wide / "checkpoint.pt")
    capsys.readouterr()
    assert module.main(run_args(module, tiny_idx_source, wide, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint ") and len(err.splitlines()) == 1
