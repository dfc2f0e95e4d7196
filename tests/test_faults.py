"""Training that survives faults: signals, kill -9, a full disk, a diverging loss, damaged or
foreign checkpoints, workdirs of other runs, bad flags; each said in one line.

Every run here is the suite's run (conftest.FLAX_RUN / TORCH_RUN: the tiny source, 3 epochs of 8
steps, one compiled Flax program). A TrainingHook (conftest) says where a run stands: a signal or a
kill lands at a train call the test chooses, and a resumed run is seen to start where its
checkpoint left off and to train only the steps that were left.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flax_impl import train as flax_train
from flax_impl.common.workdir import load_config, read_metrics, run_identity, workdir_lock
from tests.conftest import (
    FLAX_RUN,
    ROOT,
    SHAPE_EPOCHS,
    SHAPE_STEPS,
    SHAPE_STEPS_PER_CALL,
    TORCH_RUN,
    TrainingHook,
    crash_in_epoch,
    finish,
    idx_bytes,
    install_hook,
    messages,
    signal_self,
    start_hooked,
    steps_logged,
    synthetic_mnist,
    wait_paused,
    write_idx_dir,
)
from torch_ref import train as torch_train

pytestmark = pytest.mark.slow

TRAINERS = {"flax": flax_train, "torch": torch_train}
MODULES = {"flax": "flax_impl.train", "torch": "torch_ref.train"}
TOTAL_STEPS = SHAPE_EPOCHS * SHAPE_STEPS
# Train calls: Flax's chunks of SHAPE_STEPS_PER_CALL steps, torch's single steps. The first call
# of epoch 2 is where the tests stop or kill a run: mid-run, one epoch checkpointed.
CALLS_PER_EPOCH = {"flax": SHAPE_STEPS // SHAPE_STEPS_PER_CALL, "torch": SHAPE_STEPS}
EPOCH_2 = {framework: calls + 1 for framework, calls in CALLS_PER_EPOCH.items()}


def run_args(framework: str, source: str, workdir: Path, *extra: str) -> list[str]:
    """The flags of the suite's run of `framework` in `workdir`."""
    shape = FLAX_RUN if framework == "flax" else TORCH_RUN
    return ["--data-source", source, *shape, "--workdir", str(workdir), *extra]


def epochs(workdir: Path) -> list[int]:
    """The epochs recorded in `workdir`'s metrics.jsonl."""
    return [record["epoch"] for record in read_metrics(workdir / "metrics.jsonl")]


def timeless(workdir: Path) -> list[dict]:
    """`workdir`'s per-epoch records without their durations."""
    return [{k: v for k, v in record.items() if k != "seconds"}
            for record in read_metrics(workdir / "metrics.jsonl")]


def checkpoint_steps(workdir: Path) -> list[int]:
    """The global steps of a Flax workdir's checkpoints."""
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir())


def torch_checkpoint_epochs(workdir: Path) -> int:
    """The finished epochs a torch workdir's checkpoint.pt holds."""
    import torch

    return len(torch.load(workdir / "checkpoint.pt", weights_only=True)["history"])


def listing(workdir: Path) -> dict[str, bytes]:
    """Every file under `workdir` and its bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}


def copy_run(workdir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run's workdir to damage or resume."""
    return Path(shutil.copytree(workdir, tmp_path / "run"))


@pytest.fixture(scope="module")
def straight(tiny_idx_source, tmp_path_factory) -> dict[str, Path]:
    """Each framework's run, uninterrupted: what a resumed run must end with. Started with
    --resume in a new workdir (test_resume_with_nothing_to_resume_...): it starts afresh."""
    workdirs = {}
    with pytest.MonkeyPatch.context() as patch:
        for framework, trainer in TRAINERS.items():
            workdirs[framework] = tmp_path_factory.mktemp(f"straight_{framework}") / "run"
            hook = install_hook(framework, TrainingHook(), patch.setattr)
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert trainer.main(run_args(framework, tiny_idx_source, workdirs[framework],
                                             "--resume")) == 0
            (workdirs[framework].parent / "log.json").write_text(json.dumps(
                {"stdout": out.getvalue(), "steps": hook.steps}))
    return workdirs


# Signals and kills, and the resume that follows.

def test_sigterm_mid_epoch_saves_a_checkpoint_and_the_resumed_run_trains_only_the_rest(
        tiny_idx_source, tmp_path, straight, hook_training, capsys):
    """The resume of record for Flax: stopped mid-epoch by a signal from outside, resumed, it
    ends with the uninterrupted run's metrics, every one of them."""
    workdir, hooks = tmp_path / "run", tmp_path / "hooks"
    child = start_hooked("flax_impl.train", run_args("flax", tiny_idx_source, workdir), hooks,
                         pause_at=EPOCH_2["flax"])
    wait_paused([child], hooks)
    child.send_signal(signal.SIGTERM)
    stopped = finish(child)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # The chunk under way finishes; the run stops before the next one, with a checkpoint there.
    assert messages(stopped.stderr) == ["SIGTERM: stopped; saved a checkpoint at epoch 2, step 4; "
                                        "continue with --resume"]
    assert steps_logged(hooks, child) == [4, 4, 4]
    assert checkpoint_steps(workdir) == [SHAPE_STEPS, SHAPE_STEPS + 4] and epochs(workdir) == [1]

    hook = hook_training("flax")
    assert flax_train.main(run_args("flax", tiny_idx_source, workdir, "--resume")) == 0
    assert f"Resumed from {workdir / 'checkpoints'}: epoch 2, step 4/{SHAPE_STEPS}" in \
        capsys.readouterr().out
    assert hook.steps == TOTAL_STEPS - SHAPE_STEPS - 4
    assert timeless(workdir) == timeless(straight["flax"])


def test_sigint_mid_epoch_stops_at_the_next_chunk_with_a_checkpoint_as_sigterm_does(
        tiny_idx_source, tmp_path, hook_training, capsys):
    workdir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    hook = hook_training("flax", at=EPOCH_2["flax"], before=lambda: signal_self(signal.SIGINT))
    assert flax_train.main(run_args("flax", tiny_idx_source, workdir)) == 128 + signal.SIGINT
    assert messages(capsys.readouterr().err) == [
        "SIGINT: stopped; saved a checkpoint at epoch 2, step 4; continue with --resume"]
    assert hook.per_call == [4, 4, 4]
    assert checkpoint_steps(workdir) == [SHAPE_STEPS, SHAPE_STEPS + 4] and epochs(workdir) == [1]
    assert signal.getsignal(signal.SIGINT) is handler  # a later Ctrl-C acts as before the run


def test_torch_stops_at_once_on_ctrl_c_and_the_resumed_run_trains_only_the_epochs_left(
        tiny_idx_source, tmp_path, straight, hook_training, capsys):
    """The resume of record for torch: its last epoch's checkpoint brings back the dropout and
    order generators too (the metrics are the uninterrupted run's)."""
    workdir, hooks = tmp_path / "run", tmp_path / "hooks"
    child = start_hooked("torch_ref.train", run_args("torch", tiny_idx_source, workdir), hooks,
                         pause_at=EPOCH_2["torch"])
    wait_paused([child], hooks)
    child.send_signal(signal.SIGINT)
    stopped = finish(child)
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-3000:]
    assert messages(stopped.stderr) == [  # one line (what it loaded is said on stdout)
        "SIGINT: stopped at once; the last epoch's checkpoint is kept: continue with --resume"]
    assert "data: idx:" in stopped.stdout
    assert torch_checkpoint_epochs(workdir) == 1 and epochs(workdir) == [1]

    hook = hook_training("torch")
    assert torch_train.main(run_args("torch", tiny_idx_source, workdir, "--resume")) == 0
    assert f"Resumed from {workdir / 'checkpoint.pt'} after epoch 1" in capsys.readouterr().out
    assert hook.steps == TOTAL_STEPS - SHAPE_STEPS
    assert timeless(workdir) == timeless(straight["torch"])


def test_kill_9_mid_epoch_leaves_the_last_epochs_checkpoint_to_resume_from(
        tiny_idx_source, tmp_path, straight, hook_training, capsys):
    workdir, hooks = tmp_path / "run", tmp_path / "hooks"
    child = start_hooked("flax_impl.train", run_args("flax", tiny_idx_source, workdir), hooks,
                         pause_at=EPOCH_2["flax"])
    wait_paused([child], hooks)
    child.kill()
    assert finish(child).returncode == -signal.SIGKILL
    assert checkpoint_steps(workdir) == [SHAPE_STEPS] and epochs(workdir) == [1]

    hook = hook_training("flax")  # no lock left behind, no clean-up needed
    assert flax_train.main(run_args("flax", tiny_idx_source, workdir, "--resume")) == 0
    assert f"Resumed from {workdir / 'checkpoints'}: epoch 2, step 0/{SHAPE_STEPS}" in \
        capsys.readouterr().out
    assert hook.steps == TOTAL_STEPS - SHAPE_STEPS
    assert timeless(workdir) == timeless(straight["flax"])


# A full disk: a sized tmpfs (mounting one needs root, else the test is skipped), room for the
# first epochs' checkpoints only (Orbax keeps two, torch one).
@pytest.fixture
def small_filesystem(tmp_path, request):
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


@pytest.mark.parametrize("framework, small_filesystem", [("flax", "600k"), ("torch", "300k")],
                         indirect=["small_filesystem"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(
        framework, small_filesystem, tiny_idx_source, hook_training, capsys):
    trainer, workdir = TRAINERS[framework], small_filesystem / "run"
    assert trainer.main(run_args(framework, tiny_idx_source, workdir)) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith("error: ") and \
        said[0].endswith("the last complete checkpoint is kept: free some space, then --resume")
    done = len(epochs(workdir))
    assert 1 <= done < SHAPE_EPOCHS

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)
    hook = hook_training(framework)
    assert trainer.main(run_args(framework, tiny_idx_source, workdir, "--resume")) == 0
    assert ((f": epoch {done + 1}, step 0/" if framework == "flax" else f" after epoch {done}")
            in capsys.readouterr().out)
    assert hook.steps == TOTAL_STEPS - done * SHAPE_STEPS
    assert epochs(workdir) == list(range(1, SHAPE_EPOCHS + 1))


def train_under_load(*argv: str) -> subprocess.CompletedProcess:
    """`python -m flax_impl.train argv` while a busy process loads a core: what it printed."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return subprocess.run([sys.executable, "-m", "flax_impl.train", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        burner.kill()
        burner.wait()


def fill_once_saving(disk: Path, saving: Path, stop: threading.Event) -> None:
    """Fill `disk` as soon as a temporary folder of Orbax appears in `saving` (mid-save)."""
    while not stop.is_set():
        if saving.is_dir() and any("tmp" in entry.name for entry in saving.iterdir()):
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
                while True:
                    filler.write(bytes(2**16))
            return
        time.sleep(0.005)


@pytest.mark.parametrize("attempt, small_filesystem", [(attempt, "4m") for attempt in range(3)],
                         indirect=["small_filesystem"])
def test_a_disk_that_fills_during_a_save_is_one_line(attempt, small_filesystem, tiny_idx_source):
    # Orbax's threads each logged the failure with a traceback, and the writes they abandoned
    # printed more on a closed event loop (143-466 lines in 4 of 4 tries, under load): held back
    # while Orbax works, dropped once it has failed.
    stop = threading.Event()
    filler = threading.Thread(target=fill_once_saving,
                              args=(small_filesystem, small_filesystem / "run" / "checkpoints",
                                    stop))
    filler.start()
    try:
        run = train_under_load(*run_args("flax", tiny_idx_source, small_filesystem / "run"))
    finally:
        stop.set()
        filler.join()
    assert run.returncode == 2, run.stderr[-3000:]
    assert messages(run.stderr) == [
        f"error: checkpoint {small_filesystem / 'run' / 'checkpoints' / str(SHAPE_STEPS)} could "
        f"not be saved (the disk is full); the last complete checkpoint is kept: free some space, "
        f"then --resume"]


# A diverging loss.

def test_an_exploded_loss_counts_as_diverged_and_a_healthy_one_does_not():
    from flax_impl.common.errors import exploded

    assert exploded(float("nan"), 2.3) and exploded(float("inf"), 2.3)
    assert exploded(5.6e24, 2.3) and exploded(300.0, 2.3)
    assert not exploded(2.5, 2.3) and not exploded(0.01, 2.3) and not exploded(50.0, 2.3)


@pytest.mark.parametrize("framework, loss", [  # 1e30: exploded, though finite
    ("flax", 1e30), ("torch", 1e30), ("torch", float("nan"))])
def test_a_diverging_loss_stops_at_once_with_one_line_and_keeps_the_last_good_checkpoint(
        framework, loss, tiny_idx_source, tmp_path, hook_training, capsys):
    workdir = tmp_path / "run"
    hook = hook_training(framework, at=EPOCH_2[framework], loss=loss)
    assert TRAINERS[framework].main(run_args(framework, tiny_idx_source, workdir)) == 3
    steps = "1-4" if framework == "flax" else "1-1"  # the chunk, or the step, that diverged
    assert messages(capsys.readouterr().err) == [
        f"error: the training loss became {loss:.4g} in epoch 2 (steps {steps}); stopped, the "
        f"last good checkpoint is kept; try a lower --lr"]
    assert hook.calls == EPOCH_2[framework]  # no further train call
    assert epochs(workdir) == [1]
    if framework == "flax":
        assert checkpoint_steps(workdir) == [SHAPE_STEPS]
    else:
        assert torch_checkpoint_epochs(workdir) == 1


# Damaged and foreign checkpoints.

def test_a_damaged_flax_checkpoint_is_one_line_and_the_previous_one_still_resumes(
        straight, tiny_idx_source, tmp_path, hook_training, capsys):
    workdir = copy_run(straight["flax"], tmp_path)
    latest = workdir / "checkpoints" / str(TOTAL_STEPS)
    for path in latest.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    args = run_args("flax", tiny_idx_source, workdir, "--resume")
    capsys.readouterr()
    assert flax_train.main(args) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(f"error: checkpoint {latest} is corrupt or "
                                                 f"partial (")
    assert said[0].endswith("); delete it to use the previous one, or train afresh (the "
                            "trainers' --overwrite)")
    shutil.rmtree(latest)  # as the message says
    hook = hook_training("flax")
    assert flax_train.main(args) == 0
    assert f": epoch {SHAPE_EPOCHS}, step 0/" in capsys.readouterr().out
    assert hook.steps == SHAPE_STEPS
    assert timeless(workdir) == timeless(straight["flax"])


class Payload:
    """Not a tensor, dict or number: `weights_only=True` refuses to unpickle it."""


def test_a_torch_checkpoint_that_would_run_code_is_refused_in_one_line(
        straight, tiny_idx_source, tmp_path, capsys):
    import torch

    workdir = copy_run(straight["torch"], tmp_path)
    checkpoint = torch.load(workdir / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "payload": Payload()}, workdir / "checkpoint.pt")
    assert torch_train.main(run_args("torch", tiny_idx_source, workdir, "--resume")) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(
        f"error: checkpoint {workdir / 'checkpoint.pt'} is corrupt or not this run's (")
    assert "Weights only load failed" in said[0]  # torch.load(weights_only=True) refused it


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_run(framework, straight,
                                                               tiny_idx_source, tmp_path, capsys):
    workdir = copy_run(straight[framework], tmp_path)
    args = run_args(framework, tiny_idx_source, workdir, "--resume")
    if framework == "flax":  # the last step's folder renamed past the run's end
        latest = max(checkpoint_steps(workdir))
        (workdir / "checkpoints" / str(latest)).rename(
            workdir / "checkpoints" / str(latest + SHAPE_STEPS))
        expected = (f"error: --resume: the checkpoint in {workdir / 'checkpoints'} is at step "
                    f"{latest + SHAPE_STEPS}, which does not fit this run of {TOTAL_STEPS} steps "
                    f"({SHAPE_STEPS} per epoch); --overwrite to start afresh")
    else:  # the 3-epoch run's checkpoint under a 2-epoch run's config (as if two runs had mixed)
        record = json.loads((workdir / "config.json").read_text())
        (workdir / "config.json").write_text(json.dumps({**record, "epochs": 2}))
        args = [*args, "--epochs", "2"]
        expected = (f"error: --resume: {workdir / 'checkpoint.pt'} has {SHAPE_EPOCHS} finished "
                    f"epochs, more than this run's 2; --overwrite to start afresh")
    assert TRAINERS[framework].main(args) == 2
    assert messages(capsys.readouterr().err) == [expected]


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_refuses_a_checkpoint_of_another_config_whatever_config_json_says(
        framework, straight, tiny_idx_source, tmp_path, capsys):
    workdir = copy_run(straight[framework], tmp_path)
    before = listing(workdir)
    # config.json edited by hand to another peak rate, then resumed at that rate: the
    # checkpoint was trained at the first one.
    record = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**record, "lr": 0.05}))
    args = [*run_args(framework, tiny_idx_source, workdir, "--resume"), "--lr", "0.05"]
    assert TRAINERS[framework].main(args) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and "was trained by another config than this run's" in said[0], said
    assert {k: v for k, v in listing(workdir).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}  # nothing trained or rewritten


def test_resume_refuses_a_step_folder_that_links_to_another_runs(straight, tiny_idx_source,
                                                                 tmp_path, capsys):
    other = copy_run(straight["flax"], tmp_path / "other")
    workdir = copy_run(straight["flax"], tmp_path / "mine")
    newest = max(checkpoint_steps(workdir))
    shutil.rmtree(workdir / "checkpoints" / str(newest))
    (workdir / "checkpoints" / str(newest)).symlink_to(other / "checkpoints" / str(newest))
    assert flax_train.main(run_args("flax", tiny_idx_source, workdir, "--resume")) == 2
    said = messages(capsys.readouterr().err)
    assert said == [f"error: {workdir / 'checkpoints' / str(newest)} is a symbolic link, not this "
                    f"run's own checkpoint: remove it, or train afresh (the trainers' "
                    f"--overwrite)"]


def test_resume_with_a_file_for_the_checkpoints_is_refused_before_training(
        straight, tiny_idx_source, tmp_path, capsys):
    workdir = copy_run(straight["flax"], tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    (workdir / "checkpoints").write_text("")
    before = listing(workdir)
    assert flax_train.main(run_args("flax", tiny_idx_source, workdir, "--resume")) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: --resume: {workdir / 'checkpoints'} is not a directory; move it away, or "
        f"--overwrite"]
    assert listing(workdir) == before


def save_a_tinynet_checkpoint(framework: str, workdir: Path) -> None:
    """Replace the checkpoint of `workdir` (a Net run) by one of TinyNet after epoch 1 (in Flax,
    one that claims to be the run's own: its progress record carries the run's identity)."""
    from dataclasses import replace

    own = run_identity(load_config(workdir))
    config = replace(load_config(workdir), model="tinynet")
    history = read_metrics(workdir / "metrics.jsonl")[:1]
    if framework == "flax":
        import jax

        from flax_impl.extras.kernels import STOCK

        port = flax_train.create_port(config, TOTAL_STEPS, STOCK)
        shutil.rmtree(workdir / "checkpoints")
        with flax_train.checkpoint_manager(workdir) as manager:
            flax_train.save_checkpoint(manager, SHAPE_STEPS, jax.jit(port.init)(jax.random.key(0)),
                                       flax_train.Progress(2, 0, 0.0, history, own))
    else:
        run = torch_train.create_run(config, synthetic_mnist(512, 1), "cpu")
        torch_train.save_checkpoint(workdir / "checkpoint.pt", run, history)


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_refuses_a_checkpoint_of_other_shapes(framework, straight, tiny_idx_source,
                                                     tmp_path, capsys):
    workdir = copy_run(straight[framework], tmp_path)
    save_a_tinynet_checkpoint(framework, workdir)
    capsys.readouterr()
    assert TRAINERS[framework].main(run_args(framework, tiny_idx_source, workdir, "--resume")) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1
    if framework == "flax":
        assert said[0].startswith(f"error: checkpoint {workdir / 'checkpoints' / str(SHAPE_STEPS)}"
                                  f" is not one of this run's: its arrays have other shapes or "
                                  f"names (")
        assert "is not compatible with the stored shape" in said[0]  # (Orbax's words)
    else:
        assert said[0] == (f"error: checkpoint {workdir / 'checkpoint.pt'} is corrupt or not this "
                           f"run's (Error(s) in loading state_dict for Net:); delete it or "
                           f"--overwrite")


def test_flax_refuses_a_checkpoint_of_edited_widths_before_reading_its_arrays(
        straight, tiny_idx_source, tmp_path):
    # Orbax, failing to read arrays of other shapes, printed tracebacks from its threads for a
    # moment (more under load): the progress record's identity refuses it before any is read.
    workdir = copy_run(straight["flax"], tmp_path)
    record = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**record, "widths": [8, 10, 12, 12, 14, 14]}))
    resumed = train_under_load(*run_args("flax", tiny_idx_source, workdir, "--resume"),
                               "--widths", "8,10,12,12,14,14")
    assert resumed.returncode == 2
    assert resumed.stderr.splitlines() == [
        f"error: checkpoint {workdir / 'checkpoints' / str(TOTAL_STEPS)} was trained by another "
        f"config than this run's (config.json edited, or the checkpoint taken from another run); "
        f"train afresh (the trainers' --overwrite)"]


def test_flax_a_checkpoint_of_damaged_arrays_is_one_line_under_load(straight, tiny_idx_source,
                                                                   tmp_path):
    # Orbax abandons its other reads, which end in tracebacks from its threads and, once
    # collected, from the garbage collector: none may follow the command's line.
    workdir = copy_run(straight["flax"], tmp_path)
    for chunk in (workdir / "checkpoints" / str(TOTAL_STEPS) / "state").rglob("ocdbt.process_0/d/*"):
        chunk.write_bytes(b"\x00" * 40)
    resumed = train_under_load(*run_args("flax", tiny_idx_source, workdir, "--resume"))
    assert resumed.returncode == 2
    said = resumed.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith(
        f"error: checkpoint {workdir / 'checkpoints' / str(TOTAL_STEPS)} is corrupt or partial ("), said


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resuming_a_finished_run_trains_nothing_and_restores_a_truncated_metrics_file(
        framework, straight, tiny_idx_source, tmp_path, hook_training):
    workdir = copy_run(straight[framework], tmp_path)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # cut mid-line
    hook = hook_training(framework)
    assert TRAINERS[framework].main(run_args(framework, tiny_idx_source, workdir, "--resume")) == 0
    assert hook.calls == 0
    assert read_metrics(workdir / "metrics.jsonl") == read_metrics(
        straight[framework] / "metrics.jsonl")


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_resume_with_nothing_to_resume_says_so_and_trains_from_the_start(framework, straight):
    log = json.loads((straight[framework].parent / "log.json").read_text())  # (its --resume)
    assert "--resume: no checkpoint " in log["stdout"]
    assert log["steps"] == TOTAL_STEPS and epochs(straight[framework]) == list(
        range(1, SHAPE_EPOCHS + 1))


# Workdirs that defend themselves.

@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_a_workdir_of_another_run_is_refused_without_resume_or_overwrite(
        framework, straight, tiny_idx_source, tmp_path, monkeypatch, capsys):
    trainer, workdir = TRAINERS[framework], copy_run(straight[framework], tmp_path)
    other = [*run_args(framework, tiny_idx_source, workdir), "--seed", "1"]  # another run
    assert trainer.main(other) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: {workdir} already holds a run; pass --resume to continue it or --overwrite to "
        f"replace it"]
    assert trainer.main([*other, "--resume"]) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: --resume: {workdir} holds a run with a different config (seed); use the same "
        f"flags or --overwrite"]
    assert listing(workdir) == listing(straight[framework])  # refused: nothing touched
    crash_in_epoch(monkeypatch, trainer, 1)  # the other run replaces it, then stops
    assert trainer.main([*other, "--overwrite"]) == 128 + signal.SIGINT
    assert load_config(workdir).seed == 1
    assert list(listing(workdir)) == ["config.json"]  # no file of the first run is left


def test_a_busy_workdir_refuses_both_trainers_until_the_run_holding_it_is_killed(
        tiny_idx_source, tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(  # a run's lock (flock): the common modules load no framework
        [sys.executable, "-c", "import sys; from pathlib import Path; from flax_impl.common."
         "workdir import workdir_lock\nwith workdir_lock(Path(sys.argv[1])):\n print(flush=True)"
         "\n sys.stdin.read()", str(workdir)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "\n"  # holds the lock
        for framework, trainer in TRAINERS.items():  # one lock for both frameworks
            assert trainer.main(run_args(framework, tiny_idx_source, workdir, "--overwrite")) == 2
            assert messages(capsys.readouterr().err) == [
                f"error: {workdir} is in use by another run; wait for it to end or choose "
                f"another --workdir"]
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock(workdir):  # the killed run's lock died with it: no clean-up needed
        pass


def test_a_missing_config_beside_checkpoints_is_an_error_not_a_fresh_start(
        straight, tiny_idx_source, tmp_path, capsys):
    workdir = copy_run(straight["flax"], tmp_path)
    (workdir / "config.json").unlink()
    kept = listing(workdir)
    for extra in ((), ("--resume",)):
        assert flax_train.main(run_args("flax", tiny_idx_source, workdir, *extra)) == 2
        assert messages(capsys.readouterr().err) == [
            f"error: {workdir} holds a run's files (metrics.jsonl, curves.png, checkpoints) but "
            f"no config.json, so they cannot be resumed or kept; restore it, or --overwrite to "
            f"replace them"]
    assert listing(workdir) == kept  # nothing deleted


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_overwrite_keeps_the_old_run_until_the_new_ones_data_and_flags_are_checked(
        framework, straight, tiny_idx_source, tmp_path, capsys):
    trainer, workdir = TRAINERS[framework], copy_run(straight[framework], tmp_path)
    kept = listing(workdir)
    wrong_size = tmp_path / "idx32"
    wrong_size.mkdir()
    for stem, array in (("train-images-idx3-ubyte", np.zeros((64, 32, 32))),
                        ("train-labels-idx1-ubyte", np.zeros(64)),
                        ("t10k-images-idx3-ubyte", np.zeros((16, 32, 32))),
                        ("t10k-labels-idx1-ubyte", np.zeros(16))):
        (wrong_size / stem).write_bytes(idx_bytes(array))
    assert trainer.main(run_args(framework, f"idx:{wrong_size}", workdir, "--overwrite")) == 2
    assert "expected uint8[N, 28, 28]" in capsys.readouterr().err
    too_big = [*run_args(framework, tiny_idx_source, workdir, "--overwrite"), "--batch-size",
               "100000"]
    assert trainer.main(too_big) == 2
    assert listing(workdir) == kept  # the old run, whole
    # A fresh workdir that fails its checks is left as it was: not there, nothing to block.
    fresh = tmp_path / "fresh"
    assert trainer.main([*run_args(framework, tiny_idx_source, fresh), "--batch-size",
                         "100000"]) == 2
    assert not fresh.exists()


def test_a_fresh_torch_run_leaves_no_earlier_model_pt(straight, tiny_idx_source, tmp_path,
                                                      monkeypatch):
    workdir = copy_run(straight["torch"], tmp_path)
    assert (workdir / "model.pt").exists()
    crash_in_epoch(monkeypatch, torch_train, 1)
    with pytest.raises(KeyboardInterrupt):
        torch_train.train(load_config(workdir), workdir, overwrite=True)
    assert not (workdir / "model.pt").exists()  # evaluate cannot score the earlier run


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a string"', b"\xff\xfe not utf-8"])
def test_a_config_json_that_is_no_object_is_one_line(tiny_idx_source, tmp_path, capsys, content):
    (tmp_path / "config.json").write_bytes(content)
    assert flax_train.main(run_args("flax", tiny_idx_source, tmp_path, "--resume")) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: {tmp_path / 'config.json'} is not a training config (a JSON object); use "
        f"--overwrite"]


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_a_workdir_that_is_a_file_is_one_line(framework, tiny_idx_source, tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    assert TRAINERS[framework].main(run_args(framework, tiny_idx_source, path)) == 2
    assert messages(capsys.readouterr().err) == [
        f"error: --workdir {path} is a file; name a directory"]


@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_a_workdir_that_cannot_be_created_is_one_line(framework, where, tiny_idx_source,
                                                      tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    workdir = tmp_path / "a_file" / "run" if where == "under_a_file" else Path("/proc/mnist20k")
    assert TRAINERS[framework].main(run_args(framework, tiny_idx_source, workdir)) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith(f"error: --workdir {workdir}: cannot create it (")


# Bad flags and data: one line, exit status 2, before anything is trained (the validation of
# every flag: tests/test_config.py).

@pytest.mark.parametrize("framework", ["flax", "torch"])
@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be > 0, got 0"),
    (["--seed", str(2**70)], f"--seed must be in [0, 2**32), got {2**70}"),
    (["--batch-size", "1024"], "--batch-size 1024 is larger than the 512 training images"),
    (["--data-source", "nowhere"], "unknown data source 'nowhere'"),
])
def test_bad_flags_are_one_line_and_exit_2(framework, flags, message, tiny_idx_source, capsys):
    assert TRAINERS[framework].main(["--data-source", tiny_idx_source, *flags]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and said[0].startswith("error: ") and message in said[0]


def test_an_idx_dataset_without_test_images_is_refused_before_training(tmp_path, hook_training,
                                                                      capsys):
    mnist = synthetic_mnist(64, 1)
    empty_test = mnist._replace(test_images=mnist.test_images[:0], test_labels=mnist.test_labels[:0])
    source = f"idx:{write_idx_dir(tmp_path / 'idx', empty_test)}"
    hook = hook_training("flax")
    assert flax_train.main(["--data-source", source, "--epochs", "1", "--batch-size", "32"]) == 2
    said = messages(capsys.readouterr().err)
    assert len(said) == 1 and "no test images" in said[0]
    assert hook.calls == 0
