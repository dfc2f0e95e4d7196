"""A training workdir: config.json, metrics.jsonl, curves.png, checked before a run writes.

One run per workdir at a time (`workdir_lock`); a fresh run removes every output of an earlier
one (RUN_OUTPUTS), and only after its own flags and data have been checked. Imports neither jax
nor torch; each framework names its own checkpoint files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flax_impl.common.atomic import atomic_write
from flax_impl.common.config import Config, validate
from flax_impl.common.errors import ConfigError, WorkdirError
from flax_impl.common.report import SPLIT_NAMES, eval_split

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"  # Flax's Orbax checkpoints
# What a run leaves in its workdir besides config.json, either framework's: a fresh run removes
# them all, so that nothing of an earlier run is read as its own.
RUN_OUTPUTS = (METRICS_FILE, "curves.png", CHECKPOINT_DIR, "checkpoint.pt", "model.pt",
               "confusion.png", "errors.png")
# Drawing curves.png takes a noticeable part of a short run's epoch: it is redrawn at most this
# often while a run goes on (metrics.jsonl is rewritten every epoch).
CURVES_REDRAW_SECONDS = 30.0


@contextlib.contextmanager
def workdir_lock(workdir: Path, take: bool = True) -> Iterator[None]:
    """Hold `workdir` for one run: another run on it meanwhile gets a WorkdirError. The lock is
    the operating system's (flock on the directory), so a killed run leaves none behind. A
    directory made here and left empty is removed again. `take` false: nothing (the processes
    of a multi-process run but the first)."""
    if not take:
        yield
        return
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; name a directory")
    made = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = os.open(workdir, os.O_RDONLY)
    except OSError as error:
        raise WorkdirError(f"--workdir {workdir}: cannot create it ({error.strerror or error}); "
                           f"name a directory you can write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(f"{workdir} is in use by another run; wait for it to end or "
                               f"choose another --workdir") from None
        yield
    finally:
        os.close(handle)
        if made and workdir.is_dir() and not any(workdir.iterdir()):
            workdir.rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: never a half-written file."""
    atomic_write(path, lambda file: file.write(text.encode()))


class EpochFiles:
    """The files a run rewrites as its epochs end, in a `with` block: metrics.jsonl every epoch;
    curves.png on the first write, then when `redraw_seconds` have passed since the last
    drawing, and once more as the block ends, however it ends. Nothing without a workdir."""

    def __init__(self, workdir: Path | None, redraw_seconds: float = CURVES_REDRAW_SECONDS):
        self.workdir, self.redraw_seconds = workdir, redraw_seconds
        self._drawn_at: float | None = None  # time.monotonic() of the last drawing
        self._undrawn: list[dict] = []  # the history not yet in curves.png

    def write(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl from `history`; redraw curves.png if it is due."""
        if not self.workdir:
            return
        write_metrics(self.workdir, history)
        self._undrawn = list(history)
        if self._drawn_at is None or time.monotonic() - self._drawn_at >= self.redraw_seconds:
            self.draw()

    def draw(self) -> None:
        """Draw curves.png from the last history written, if it is not drawn yet."""
        if self._undrawn:
            write_curves(self.workdir, self._undrawn)
            self._drawn_at, self._undrawn = time.monotonic(), []

    def __enter__(self) -> EpochFiles:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # On the way out of a failed run, its own error is the one to report.
        with contextlib.suppress(Exception) if exc_type else contextlib.nullcontext():
            self.draw()


def check_free_space(directory: Path, state_bytes: int) -> None:
    """WorkdirError if the disk holding `directory` lacks room for a checkpoint of a state of
    `state_bytes` (before anything is written: the last complete checkpoint stays)."""
    needed = 2 * state_bytes + 2**16  # with metadata
    if (free := shutil.disk_usage(directory).free) < needed:
        raise WorkdirError(f"the disk holding {directory} has {free / 2**20:.1f} MiB free, a "
                           f"checkpoint needs about {needed / 2**20:.1f}; the last complete "
                           f"checkpoint is kept: free some space, then --resume")


def prepare_workdir(workdir: Path, config: Config, framework: str, resume: bool,
                    overwrite: bool, primary: bool = True,
                    barrier: Callable[[], None] = lambda: None) -> bool:
    """`check_workdir`, then `create_workdir` for a fresh run; whether the run is fresh.

    Call it once the run's flags and data are checked: a fresh run removes the earlier one's
    files. In a multi-process run every process checks and the `primary` one alone creates;
    `barrier` (wait for all processes) keeps it from changing the workdir while another still
    reads it.
    """
    fresh = check_workdir(workdir, config, framework, resume, overwrite)
    barrier()
    if fresh and primary:
        create_workdir(workdir, config, framework)
    barrier()
    return fresh


def config_record(config: Config, framework: str) -> dict:
    """What a workdir's config.json holds: the Config's fields and "framework" (torch's without
    "api": it has one)."""
    record = {"framework": framework, **json.loads(config.to_json())}
    if framework == "torch":
        del record["api"]
    return record


def check_workdir(workdir: Path, config: Config, framework: str, resume: bool,
                  overwrite: bool) -> bool:
    """Whether `workdir` is to be created afresh for `config` (True) or holds its run to resume.

    A workdir holding another run is refused unless `resume` (same config only) or `overwrite`;
    so is one with a run's files but no config.json (nothing says what they are). Reads only: in
    a multi-process run every process checks, then one creates.
    """
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; name a directory")
    config_path = workdir / CONFIG_FILE
    if overwrite:
        return True
    if not config_path.exists():
        found = [name for name in RUN_OUTPUTS if (workdir / name).exists()]
        if found:
            raise WorkdirError(f"{workdir} holds a run's files ({', '.join(found)}) but no "
                               f"{CONFIG_FILE}, so they cannot be resumed or kept; restore it, "
                               f"or --overwrite to replace them")
        return True
    try:
        existing = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        existing = None
    if not isinstance(existing, dict):
        raise WorkdirError(f"{config_path} is not a training config (a JSON object); use "
                           f"--overwrite") from None
    if not resume:
        raise WorkdirError(
            f"{workdir} already holds a run; pass --resume to continue it or --overwrite "
            f"to replace it"
        )
    record = config_record(config, framework)
    # A field added after the run was recorded holds its default value there.
    defaults = config_record(Config(), framework)
    existing = {**{k: v for k, v in defaults.items() if k not in existing}, **existing}
    if existing != record:
        changed = sorted(k for k in record.keys() | existing.keys()
                         if record.get(k) != existing.get(k))
        raise WorkdirError(
            f"--resume: {workdir} holds a run with a different config ({', '.join(changed)}); "
            f"use the same flags or --overwrite"
        )
    if framework == "flax" and (workdir / CHECKPOINT_DIR).exists() and \
            not (workdir / CHECKPOINT_DIR).is_dir():  # said now, not after an epoch's training
        raise WorkdirError(f"--resume: {workdir / CHECKPOINT_DIR} is not a directory; move it "
                           f"away, or --overwrite")
    return False


def create_workdir(workdir: Path, config: Config, framework: str) -> None:
    """Make `workdir` hold a fresh run of `config`: config.json, and none of RUN_OUTPUTS of an
    earlier run."""
    workdir.mkdir(parents=True, exist_ok=True)
    stale = [workdir / name for name in RUN_OUTPUTS if os.path.lexists(workdir / name)]
    for path in stale:  # everything is checked before anything is deleted
        if path.is_symlink():
            raise WorkdirError(f"{path} is a symbolic link: nothing of the earlier run is "
                               f"deleted through it; remove it yourself, then run again")
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    atomic_write_text(workdir / CONFIG_FILE,
                      json.dumps(config_record(config, framework), indent=2, sort_keys=True) + "\n")


def workdir_record(workdir: str | Path) -> dict:
    """A training workdir's config.json: the Config's fields and "framework" ("flax"/"torch")."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise WorkdirError(f"{workdir} is not a training workdir (no {CONFIG_FILE}); train "
                           f"with --workdir first")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("framework") not in ("flax", "torch"):
        raise WorkdirError(f"{path} is not a training config; train with --workdir again")
    return record


def load_config(workdir: str | Path) -> Config:
    """The Config recorded in a training workdir's config.json, validated (WorkdirError if it
    describes no run this version can build)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    try:
        return validate(Config(**{k: v for k, v in workdir_record(workdir).items()
                                  if k in fields}))
    except (ConfigError, TypeError, ValueError) as error:
        raise WorkdirError(f"{Path(workdir) / CONFIG_FILE} describes no run this version can "
                           f"build ({error}); train again with --workdir") from None


def run_identity(config: Config) -> str:
    """What a checkpoint says of the run that wrote it: a hash of the config that trained it
    (of its fields that differ from the defaults: a field added later changes no hash)."""
    defaults = dataclasses.asdict(Config())
    changed = {k: v for k, v in dataclasses.asdict(config).items() if v != defaults[k]}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]


def check_identity(saved, identity: str, where: str) -> None:
    """WorkdirError unless `saved` (a checkpoint's identity) is this run's `identity`: a
    checkpoint of another config (config.json edited since) or of another run is not resumed."""
    if saved != identity:
        raise WorkdirError(f"{where} was trained by another config than this run's (config.json "
                           f"edited, or the checkpoint taken from another run); train afresh (the "
                           f"trainers' --overwrite)")


def checked_history(history, where: str) -> list[dict]:
    """`history` (a checkpoint's records of its finished epochs, read back) if it is a list of
    records of epochs 1, 2, ... with finite numbers; WorkdirError naming `where` otherwise."""
    valid = isinstance(history, list) and all(
        isinstance(record, dict) and record.get("epoch") == epoch and all(
            isinstance(value, int | float) and math.isfinite(value) and not isinstance(value, bool)
            for value in record.values())
        for epoch, record in enumerate(history, start=1))
    if not valid:
        raise WorkdirError(f"{where}: its record of the finished epochs is damaged; delete it "
                           f"to use the previous checkpoint, or train afresh (the trainers' "
                           f"--overwrite)")
    return history


def checked_progress(progress, where: str) -> dict:
    """A Flax checkpoint's progress (epoch, step, loss_sum, history, run), read back, if whole
    and consistent; WorkdirError naming `where` otherwise (before anything uses it)."""
    fields = {"epoch": int, "step": int, "loss_sum": int | float, "history": list, "run": str}
    valid = (isinstance(progress, dict) and progress.keys() == fields.keys()
             and all(isinstance(progress[k], t) and not isinstance(progress[k], bool)
                     for k, t in fields.items())
             and progress["epoch"] >= 1 and progress["step"] >= 0
             and math.isfinite(progress["loss_sum"]))
    if not valid:
        raise WorkdirError(f"{where}: its progress record is damaged; delete it to use the "
                           f"previous checkpoint, or train afresh (the trainers' --overwrite)")
    checked_history(progress["history"], where)
    if len(progress["history"]) != progress["epoch"] - 1:
        raise WorkdirError(f"{where}: its progress record is inconsistent; delete it to use "
                           f"the previous checkpoint, or train afresh (the trainers' --overwrite)")
    return progress


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of a metrics.jsonl (empty if it does not exist)."""
    if not path.exists():
        return []
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkdirError(f"{path} is not a metrics file ({error}); rerun the training that "
                           f"wrote it") from None
    if not all(isinstance(record, dict) for record in records):
        raise WorkdirError(f"{path} is not a metrics file (a line is not a JSON object)")
    return records


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl with `history` (atomically, so it always matches a checkpoint)."""
    text = "".join(json.dumps(m) + "\n" for m in history)
    atomic_write_text(workdir / METRICS_FILE, text)


def write_curves(workdir: Path, history: list[dict]) -> Path:
    """Plot train and test (or validation) loss and accuracy per epoch into `workdir/curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs, split = [m["epoch"] for m in history], eval_split(history[-1])
    name = SPLIT_NAMES[split]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    loss_axis.plot(epochs, [m[f"{split}_loss"] for m in history], "o-", label=name)
    loss_axis.set(xlabel="epoch", ylabel="NLL loss", yscale="log", title="Loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [100 * m[f"{split}_accuracy"] for m in history], "o-", color="C2")
    accuracy_axis.axhline(99.4, color="grey", linestyle="--", label="99.4 % target")
    accuracy_axis.set(xlabel="epoch", ylabel=f"{name} accuracy (%)",
                      title=f"{name.capitalize()} accuracy")
    accuracy_axis.legend()
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Fixed margins: tight_layout measures every label each epoch, for the same layout.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.25)
    path = workdir / "curves.png"
    atomic_write(path, lambda file: figure.savefig(file, dpi=100, format="png"))
    plt.close(figure)
    return path
