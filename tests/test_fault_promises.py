"""The README's fault promises where a demanding user found them broken (issue #42): signals that
act at once, workdirs that cannot be turned against the user, one line everywhere."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flax_impl import train as flax_train
from flax_impl.common import errors, workdir
from flax_impl.common.config import Config, recipe_config
from flax_impl.common.errors import ConfigError, WorkdirError
from tests.conftest import FLAX_RUN, ROOT, messages

PYTHON = sys.executable


def run(module: str, *argv: str, cwd: Path = ROOT, timeout: float = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module argv`: its exit status and output."""
    return subprocess.run([PYTHON, "-m", module, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                **(env or {})})


def one_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one line a command that failed with `code` said on stderr (asserted)."""
    said = messages(result.stderr)
    assert result.returncode == code, result.stderr[-2000:]
    assert len(said) == 1, said
    return said[0]


# --- Workdirs ---------------------------------------------------------------------------------

def test_an_empty_workdir_is_refused_and_the_current_directory_left_alone(tmp_path):
    (tmp_path / "model.pt").write_text("mine")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine too")
    result = run("flax_impl.train", "--workdir", "", "--overwrite", cwd=tmp_path)
    assert "--workdir" in one_line(result, 2)
    assert (tmp_path / "model.pt").read_text() == "mine"
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "mine too"


def test_pictures_replace_a_symbolic_link_and_never_write_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "curves.png").symlink_to(outside)
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 0.5, "test_accuracy": 0.9,
                "seconds": 1.0}]
    workdir.write_curves(run_dir, history)
    assert outside.read_text() == "not yours"
    assert not (run_dir / "curves.png").is_symlink()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_pictures_never_write_through_a_link(tmp_path):
    import numpy as np

    from flax_impl.evaluate import plot_confusion

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (tmp_path / "confusion.png").symlink_to(outside)
    plot_confusion(np.eye(10, dtype=np.int64), tmp_path / "confusion.png")
    assert outside.read_text() == "not yours"
    assert not (tmp_path / "confusion.png").is_symlink()


def test_overwrite_checks_every_output_before_deleting_any(tmp_path):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("kept")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "curves.png").write_bytes(b"png")
    (run_dir / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(WorkdirError, match="symbolic link"):
        workdir.create_workdir(run_dir, Config(), "flax")
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "curves.png").exists()
    assert (elsewhere / "keep").read_text() == "kept"


# --- Silently wrong -----------------------------------------------------------------------------

def test_a_schedule_whose_warmup_ends_at_step_0_is_refused_naming_the_flags():
    config = Config(epochs=1, batch_size=128, warmup_fraction=0.125)
    with pytest.raises(ConfigError, match="--warmup-fraction 0.125 of this run's 8 steps"):
        config.steps_per_epoch(1024)
    assert Config(epochs=1, batch_size=128, warmup_fraction=0.3).steps_per_epoch(1024) == 8


def test_resume_without_a_workdir_is_one_line(capsys):
    assert flax_train.main(["--resume", "--epochs", "1"]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and "--workdir" in said[0]


def test_processes_started_with_other_flags_are_refused_in_one_line():
    from flax_impl.common.config import check_same_flags

    same = json.loads(recipe_config("fast").to_json())
    check_same_flags([same, dict(same)])
    with pytest.raises(ConfigError, match=r"process 1 .* \(dropout, max_rotation\)"):
        check_same_flags([same, {**same, "dropout": 0.2, "max_rotation": 0.0}])


# --- One line everywhere --------------------------------------------------------------------

def test_a_bad_choice_is_one_line_not_the_usage_block():
    result = run("flax_impl.train", "--recipe", "bogus")
    assert "invalid choice: 'bogus'" in one_line(result, 2)


def test_a_directory_that_cannot_be_written_is_one_line(capsys):
    def write():
        raise PermissionError(errno.EACCES, "Permission denied", "/w/config.json")

    assert errors.run_command(write) == 2
    said = messages(capsys.readouterr().err)
    assert said == ["error: /w/config.json: Permission denied; choose a directory you can "
                    "write to (or make it writable)"]


def test_a_file_where_evaluate_wants_a_directory_is_one_line(tmp_path, capsys):
    from flax_impl import evaluate

    (tmp_path / "config.json").mkdir()  # not a workdir's config either
    assert evaluate.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "f" / "x")]) == 2
    assert len(messages(capsys.readouterr().err)) == 1


def test_a_config_json_that_is_a_directory_or_names_no_model_is_one_line(tmp_path, capsys):
    from flax_impl import predict

    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (28, 28), 255).save(image)
    (tmp_path / "a" / "config.json").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(
        {"framework": "flax", **json.loads(Config().to_json()), "model": "nonet"}))
    for case in ("a", "b"):
        assert predict.main(["--workdir", str(tmp_path / case), str(image)]) == 2
        said = messages(capsys.readouterr().err)
        assert len(said) == 1, said


def test_a_malformed_metrics_line_is_a_workdir_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2,\n')
    with pytest.raises(WorkdirError, match="not a metrics file"):
        workdir.read_metrics(path)


def test_a_damaged_progress_record_is_refused_before_it_is_used():
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 0.5, "test_accuracy": 0.9,
                "seconds": 1.0}]
    good = {"epoch": 2, "step": 0, "loss_sum": 0.0, "history": history, "run": "0123abcd"}
    assert workdir.checked_progress(good, "here") == good
    for damaged in ({**good, "epoch": "2"}, {**good, "extra": 1},
                    {k: v for k, v in good.items() if k != "step"},
                    {**good, "history": [{**history[0], "epoch": "1"}]},
                    {**good, "epoch": 3}):
        with pytest.raises(WorkdirError, match="here"):
            workdir.checked_progress(damaged, "here")


# --- Signals ------------------------------------------------------------------------------------

BUSY_CHILD = """
import signal, sys, jax, jax.numpy as jnp
from flax_impl.common.signals import SignalWatch, stop_requests

@jax.jit
def busy(x):  # minutes of XLA work in one call: no Python bytecode runs meanwhile
    return jax.lax.fori_loop(0, 10**9, lambda i, y: jnp.sin(y) @ y / 64.0, x)

with SignalWatch("; kept"), stop_requests() as stop:
    x = jnp.ones((64, 64))
    busy.lower(x).compile()
    print("busy", flush=True)
    busy(x).block_until_ready()
"""


@pytest.fixture
def busy():
    """A child process busy in one long XLA computation (killed however the test ends)."""
    process = subprocess.Popen([PYTHON, "-c", BUSY_CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stdout.readline().strip() == "busy"
        yield process
    finally:
        process.kill()
        process.communicate()


@pytest.mark.slow
def test_a_second_signal_acts_at_once_while_a_jitted_computation_runs(busy):
    process = busy
    process.send_signal(signal.SIGINT)  # the first: a request to stop at the next chunk
    time.sleep(0.5)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)  # the second acts at once, whatever XLA is doing
    _, stderr = process.communicate(timeout=60)  # a guard: the computation runs for minutes
    assert process.returncode == 128 + signal.SIGTERM
    assert messages(stderr) == ["SIGTERM: stopped at once; kept"]


@pytest.mark.slow
def test_a_sigterm_right_after_a_sigint_is_not_lost(busy):
    process = busy
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert len(messages(stderr)) == 1


@pytest.mark.slow
def test_ctrl_c_while_the_imports_load_is_one_line():
    process = subprocess.Popen([PYTHON, "-m", "flax_impl.train", "--epochs", "1"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(0.3)  # (jax takes seconds to import; any moment from start-up on is one line)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    assert len(messages(stderr)) == 1 and messages(stderr)[0].startswith("SIGINT: stopped")


def test_a_signal_during_the_last_evaluation_stops_with_its_status(tiny_idx_source, tmp_path,
                                                                   monkeypatch):
    import contextlib
    import types

    from flax_impl import core

    watch = types.SimpleNamespace(signal=None)  # what the watcher thread sets on a signal
    monkeypatch.setattr(flax_train, "stop_requests", lambda: contextlib.nullcontext(watch))
    real, epochs = core.make_evaluate, int(FLAX_RUN[1])

    def evaluate_then_signal(*args, **kwargs):
        evaluate, calls = real(*args, **kwargs), []

        def evaluated(*inner):
            calls.append(1)
            if len(calls) == epochs:  # the last epoch's evaluation
                watch.signal = signal.SIGINT
            return evaluate(*inner)

        return evaluated

    monkeypatch.setattr(core, "make_evaluate", evaluate_then_signal)
    config = recipe_config(epochs=epochs, batch_size=int(FLAX_RUN[3]),
                           data_source=tiny_idx_source)
    with pytest.raises(errors.TrainingStopped) as stopped:
        flax_train.train(config, tmp_path / "w", steps_per_call=int(FLAX_RUN[5]))
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert f"after epoch {epochs}" in str(stopped.value)
    assert len(workdir.read_metrics(tmp_path / "w" / "metrics.jsonl")) == epochs


# --- Several processes --------------------------------------------------------------------

@pytest.mark.slow
def test_a_process_whose_peers_never_join_is_one_line_and_exit_4():
    result = run("flax_impl.train", "--coordinator-address", "localhost:29517",
                 "--num-processes", "2", "--process-id", "0", "--distributed-timeout", "3",
                 env={"JAX_PLATFORMS": "cpu"})
    assert "did not all join" in one_line(result, 4)


def test_an_unresolvable_coordinator_is_one_line_and_exit_2():
    result = run("flax_impl.train", "--coordinator-address", "nohost.invalid:29518",
                 "--num-processes", "2", "--process-id", "0", env={"JAX_PLATFORMS": "cpu"})
    assert "cannot resolve" in one_line(result, 2)


def test_accuracy_names_a_malformed_results_line_in_one_line(tmp_path, capsys):
    from compare import accuracy

    for framework in ("flax", "torch"):
        (tmp_path / framework).mkdir()
        (tmp_path / framework / "seed0.jsonl").write_text('{"epoch": 1,\n')
    assert accuracy.main(["--results", str(tmp_path)]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and "not a metrics file" in said[0]


def test_accuracy_replaces_a_linked_picture_never_its_target(tmp_path, capsys):
    from compare import accuracy

    for framework in ("flax", "torch"):
        (tmp_path / framework).mkdir()
        (tmp_path / framework / "seed0.jsonl").write_text(json.dumps(
            {"epoch": 1, "train_loss": 0.1, "test_loss": 0.1, "test_accuracy": 0.995,
             "seconds": 1.0}) + "\n")
    (tmp_path / "precious").write_text("keep me")
    (tmp_path / "curves.png").symlink_to(tmp_path / "precious")
    assert accuracy.main(["--results", str(tmp_path), "--png", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "precious").read_text() == "keep me"
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_convert_is_a_command_that_converts_both_ways(tmp_path, capsys):
    import torch

    from compare import convert

    with pytest.raises(SystemExit):
        convert.main(["--help"])
    assert "torch" in capsys.readouterr().out
    torch.manual_seed(0)
    original = convert.torch_model("tinynet").state_dict()
    torch.save(original, tmp_path / "model.pt")
    assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / "v.npz"), "--model",
                         "tinynet"]) == 0
    assert convert.main([str(tmp_path / "v.npz"), str(tmp_path / "back.pt"), "--model",
                         "tinynet"]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in original.items()
               if not k.endswith("num_batches_tracked"))
    assert convert.main([str(tmp_path / "missing.pt"), str(tmp_path / "x.npz")]) == 2
    assert len(messages(capsys.readouterr().err)) == 1


def test_convert_writes_the_name_given_never_through_a_link_nor_over_its_input(tmp_path,
                                                                                 capsys):
    import torch

    from compare import convert

    torch.save(convert.torch_model("tinynet").state_dict(), tmp_path / "model.pt")
    argv = ["--model", "tinynet"]
    assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / "out.txt"), *argv]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "out.txt"]
    (tmp_path / "precious").write_text("keep me")
    (tmp_path / "link.npz").symlink_to(tmp_path / "precious")
    assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / "link.npz"), *argv]) == 0
    assert (tmp_path / "precious").read_text() == "keep me"  # the link itself was replaced
    assert not (tmp_path / "link.npz").is_symlink()
    before = (tmp_path / "model.pt").read_bytes()
    capsys.readouterr()
    for target in ("model.pt", "."):  # its own input; a directory
        assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / target), *argv]) == 2
        said = messages(capsys.readouterr().err)
        assert len(said) == 1 and said[0].startswith("error: "), said
    assert (tmp_path / "model.pt").read_bytes() == before


def test_outputs_get_the_users_umask(tmp_path):
    from flax_impl.common.atomic import write_output

    previous = os.umask(0o027)
    try:
        write_output(tmp_path / "out.json", lambda file: file.write(b"{}"))
    finally:
        os.umask(previous)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
def test_two_processes_started_with_other_flags_both_refuse_in_one_line():
    import socket

    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    common = ["-m", "flax_impl.train", "--epochs", "1", "--coordinator-address",
              f"localhost:{port}", "--num-processes", "2", "--distributed-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen([PYTHON, *common, "--process-id", str(index), *extra],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
                 for index, extra in ((0, ["--dropout", "0.1"]), (1, []))]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            said = [line for line in messages(stderr) if not line.startswith("[Gloo]")]
            assert process.returncode == 2, stderr[-2000:]
            assert said == ["error: process 1 was started with other flags than process 0 "
                            "(dropout): start every process with the same flags"]
    finally:
        for process in processes:
            process.kill()


HUGE_WIDTHS = ",".join(["100000"] * 6)
# Every command, through inputs a hostile or careless user gives: (module, argv, exit status,
# what its one line says). `{tmp}` is a fresh directory holding model.pt (a torch Net) and fifo
# (a named pipe: a rename over it, or over /dev/null, would replace it).
HOSTILE = [
    *[(module, ["--no-such-flag"], 2, "error: ")  # (or: a required argument is missing)
      for module in ("flax_impl.train", "torch_ref.train", "flax_impl.predict",
                     "flax_impl.evaluate", "compare.evaluate", "compare.predict",
                     "compare.params", "compare.parity", "compare.accuracy", "compare.speed",
                     "compare.sweep", "compare.gpu_check", "compare.convert")],
    ("flax_impl.train", ["--widths", HUGE_WIDTHS], 2, "at most 1024 channels"),
    ("torch_ref.train", ["--widths", HUGE_WIDTHS], 2, "at most 1024 channels"),
    ("compare.params", ["--widths", HUGE_WIDTHS], 2, "at most 1024 channels"),
    ("flax_impl.evaluate", ["--workdir", "/proc/self"], 2, "/proc/self"),
    ("flax_impl.predict", ["--workdir", "/dev/null", "x.png"], 2, "error: "),
    ("compare.convert", ["{tmp}/model.pt", "{tmp}/model.pt"], 2, "this command's input"),
    ("compare.convert", ["{tmp}/model.pt", "/proc/self/out.npz"], 2, "takes no new files"),
    ("compare.convert", ["{tmp}/model.pt", "{tmp}"], 2, "is a directory"),
    ("compare.sweep", ["--out", "/proc/self/sweep.txt"], 2, "takes no new files"),
    ("compare.sweep", ["--out", "{tmp}/fifo"], 2, "not a regular file"),
    ("compare.convert", ["{tmp}/model.pt", "/dev/model.npz"], 2, "takes no new files"),
    ("compare.accuracy", ["--results", "{tmp}/none"], 2, "no results"),
    ("flax_impl.train", ["--overwrite"], 2, "give --workdir"),
    ("flax_impl.evaluate", ["--workdir", "{tmp}", "--out", ""], 2, "is empty"),
    ("torch_ref.train", ["--overwrite"], 2, "give --workdir"),
]


@pytest.mark.parametrize("module, argv, status, said", HOSTILE,
                         ids=[f"{m.split('.')[-1]}-{' '.join(a)[:30]}" for m, a, *_ in HOSTILE])
def test_every_command_answers_a_hostile_input_in_one_line(module, argv, status, said, tmp_path,
                                                           capsys):
    import importlib

    import torch

    from compare.convert import torch_model

    torch.save(torch_model("net").state_dict(), tmp_path / "model.pt")
    os.mkfifo(tmp_path / "fifo")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit:  # the parsers' errors
        code = exit.code
    lines = messages(capsys.readouterr().err)
    assert code == status and len(lines) == 1 and said in lines[0], (code, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("framework", ["flax_impl.train", "torch_ref.train"])
def test_a_workdir_that_takes_no_files_is_one_line(framework, tiny_idx_source, capsys):
    import importlib

    argv = ["--data-source", tiny_idx_source, "--epochs", "3", "--batch-size", "64",
            "--workdir", "/proc/self"]
    assert importlib.import_module(framework).main(argv) == 2
    said = messages(capsys.readouterr().err)
    assert said == ["error: /proc/self/config.json: the directory takes no new files; choose a "
                    "directory you can write to (or make it writable)"]


@pytest.mark.slow
@pytest.mark.parametrize("module, argv", [
    ("flax_impl.train", ["--epochs", "1"]), ("flax_impl.evaluate", ["--workdir", "{tmp}"]),
    ("flax_impl.predict", ["--workdir", "{tmp}", "{tmp}/digit.png"]),
    ("compare.evaluate", ["--workdir", "{tmp}"]), ("compare.parity", ["--checks", "4"]),
    ("compare.speed", ["--steps", "1", "--no-epoch"])], ids=lambda value: str(value)[:20])
def test_a_platform_jax_cannot_start_is_one_line_in_every_jax_command(module, argv, tmp_path):
    from PIL import Image, ImageDraw

    digit = Image.new("L", (28, 28))
    ImageDraw.Draw(digit).line([(14, 4), (14, 24)], fill=255, width=3)  # a "1"
    digit.save(tmp_path / "digit.png")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = run(module, *argv, env={"JAX_PLATFORMS": "cuda"})
    if result.returncode == 0:  # a machine with a GPU and jax[cuda]
        pytest.skip("this machine has the device JAX_PLATFORMS names")
    assert one_line(result, 2).startswith("error: JAX cannot start a device (JAX_PLATFORMS='cuda'")
