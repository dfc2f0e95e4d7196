"""The accelerator check: `python -m compare.gpu_check --out DIR` on a GPU (or TPU) machine.

One prepared command for a lent accelerator, where jax, flax, optax, orbax and torch are
installed and nothing can be downloaded (no tfds, no network). After asking what devices JAX and
torch see, it runs these steps, each in its own process with its own time limit, inside one
deadline (`TOTAL_SECONDS`: a step that would start too late is skipped and said so), so that one
failure or overrun leaves the others' results:

1. peak: the accelerator's own float32 peak, measured on it: a large matrix product at full
   float32 precision (no TF32), timed in JAX on its default device and in torch on CUDA;
2. parity: the parity checks (`compare.parity`), torch on CUDA and JAX on its accelerator, TF32 off;
3. speed (`compare.speed --ablation`): Flax against torch, stock Flax against the fast kernels, a
   `lax.scan` of 39 steps against a loop of single steps; each framework's training step in
   GFLOP/s and as a share of the peak of step 1;
4. phases: the default recipe (20 epochs) built from the product's own functions
   (`flax_impl.train.create_port`, `core.make_train_chunk`, `make_evaluate`, `epoch_plan`,
   `save_checkpoint`) with each phase of the whole run timed: start-up (the interpreter and the
   imports), data loading, compilation (each program's `.lower(...).compile()`, on an empty
   compilation cache: what a first run pays), the train steps, the evaluations, the checkpoints,
   and the rest;
5. the fast recipe (`--recipe fast`, 3 epochs), in Flax and in torch (the training commands):
   the training seconds to the first epoch at >= 99.4 % (the per-epoch "seconds" of metrics.jsonl
   summed, as the speed records count them);
6. the default recipe, 20 epochs, in Flax and in torch (the training commands).

Writes 8 files into DIR (at most what the device tool brings back): summary.json (devices, each
step's exit status and seconds, the peak, the speed shares, the phase split, each training's
recipe, model and per-epoch metrics, the time to 99.4 %), check.log (the peak and phase steps'
output), parity.txt, speed.txt, speed.json, fast.log (both fast trainings), flax_train.log and
torch_train.log. MNIST comes from the cache; `--mnist-gz FILE` unpacks a gzipped cache (made here
with `--pack FILE`, 11 MB instead of 55) into a temporary cache first. `--steps a,b` runs only
those steps; `--quick` a small version of each (a smoke run on any machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from compare.accuracy import TARGET, first_epoch_at_target, seconds_to_target
from flax_impl.common.atomic import write_output
from flax_impl.common.config import OneLineParser
from flax_impl.common.data import CACHE_FILE, cache_dir
from flax_impl.common.errors import WorkdirError
from flax_impl.common.workdir import read_metrics, workdir_record

TOTAL_SECONDS = 570  # the whole check, inside one 600-second device command
MIN_STEP_SECONDS = 15  # a step with less time left than this is skipped
SPAWNED_AT = "GPU_CHECK_SPAWNED_AT"  # the wall-clock time a timed child was started


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: `python ARGV` (formatted with {out}, {work}, {data}), its time limit, the log
    in DIR its output is appended to, and what it leaves: a training `workdir`, a JSON `result`
    file (both read into the summary)."""

    name: str
    argv: tuple[str, ...]
    limit: int
    log: str
    workdir: str | None = None
    result: str | None = None
    quick: tuple[str, ...] = ()  # flags added with --quick
    full: tuple[str, ...] = ()  # flags added without it
    env: tuple[tuple[str, str], ...] = ()  # environment added for this step


SMALL_TRAINING = ("--epochs", "1", "--train-examples", "512")
# The caps add up to more than TOTAL_SECONDS, the deadline that bounds the whole: each is a step's
# time on an H200 (results/gpu/) with room to spare, the quick steps first, the default recipe's
# two 20-epoch trainings last.
STEPS = (
    Step("peak", ("-m", "compare.gpu_check", "--peak-json", "{work}/peak.json"), 60,
         "check.log", result="{work}/peak.json", quick=("--peak-size", "512")),
    Step("parity", ("-m", "compare.parity", "--device", "auto", "--data-source", "{data}"), 120,
         "parity.txt", quick=("--checks", "4,5")),
    Step("speed", ("-m", "compare.speed", "--no-epoch", "--steps", "312", "--steps-per-call",
                   "39", "--json", "{out}/speed.json", "--data-source", "{data}"), 150,
         "speed.txt", result="{out}/speed.json", quick=("--steps", "2", "--steps-per-call", "1"),
         full=("--ablation",)),
    Step("phases", ("-m", "compare.gpu_check", "--phases-json", "{work}/phases.json",
                    "--data-source", "{data}", "--workdir", "{work}/phases"), 100, "check.log",
         result="{work}/phases.json", quick=SMALL_TRAINING,
         env=(("MNIST20K_JAX_CACHE", "{work}/cold_cache"),)),  # compiled cold
    Step("flax_fast", ("-m", "flax_impl.train", "--recipe", "fast", "--workdir",
                       "{work}/flax_fast", "--data-source", "{data}"), 60, "fast.log",
         workdir="{work}/flax_fast", quick=SMALL_TRAINING),
    Step("torch_fast", ("-m", "torch_ref.train", "--recipe", "fast", "--device", "auto",
                        "--workdir", "{work}/torch_fast", "--data-source", "{data}"), 60,
         "fast.log", workdir="{work}/torch_fast", quick=SMALL_TRAINING),
    Step("flax_train", ("-m", "flax_impl.train", "--workdir", "{work}/flax", "--data-source",
                        "{data}"), 90, "flax_train.log", workdir="{work}/flax",
         quick=SMALL_TRAINING),
    Step("torch_train", ("-m", "torch_ref.train", "--device", "auto", "--workdir",
                         "{work}/torch", "--data-source", "{data}"), 120, "torch_train.log",
         workdir="{work}/torch", quick=SMALL_TRAINING),
)

DEVICES_SCRIPT = """
import json, platform
import jax, torch
found = {"python": platform.python_version(), "jax": jax.__version__,
         "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
         "torch": torch.__version__, "torch_cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    found["torch_device"] = torch.cuda.get_device_name()
print(json.dumps(found))
"""


def devices(env: dict) -> dict:
    """What JAX and torch see, asked in a child process: this one must not hold the GPU (JAX
    takes most of its memory when it starts) while the steps run."""
    result = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"error: jax or torch does not start here: "
                         f"{(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def card_name(found: dict) -> str:
    """A folder name for the accelerator: e.g. 'nvidia-h100-80gb-hbm3', or the backend."""
    name = found.get("torch_device") or found["jax_backend"]
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def pack_cache(target: Path) -> None:
    """Write a gzipped copy of this machine's MNIST cache to `target`."""
    source = cache_dir() / CACHE_FILE
    if not source.is_file():
        raise SystemExit(f"error: no MNIST cache at {source}; run `python -c 'from "
                         f"flax_impl.common.data import load_mnist; load_mnist()'` first")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as raw, gzip.open(target, "wb", compresslevel=9) as packed:
        shutil.copyfileobj(raw, packed)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) from {source}")


def unpack_cache(packed: Path, directory: Path) -> None:
    """Unpack a `pack_cache` file as the MNIST cache in `directory` (checked when loaded)."""
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(packed, "rb") as source, open(directory / CACHE_FILE, "wb") as raw:
        shutil.copyfileobj(source, raw)


# --- 1. The accelerator's own peak -------------------------------------------------------------


def best_gflops(run, size: int, repeats: int) -> dict:
    """GFLOP/s of the (size x size) @ (size x size) float32 product `run()` (which returns when
    the product is done), from the fastest of `repeats` timed runs after a warm-up."""
    run()  # compiles, warms up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    flops = 2 * size ** 3
    return {"gflops": flops / min(times) / 1e9, "median_gflops": flops / sorted(times)[
        len(times) // 2] / 1e9, "size": size, "repeats": repeats}


def jax_peak(size: int, repeats: int) -> dict:
    """The float32 matrix-product peak of JAX's default device, at full precision."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
    product = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    found = best_gflops(lambda: product(a, b).block_until_ready(), size, repeats)
    return {**found, "device": str(jax.devices()[0])}


def torch_peak(size: int, repeats: int) -> dict | None:
    """The float32 matrix-product peak of torch's CUDA device, TF32 off; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    pair = [torch.randn(size, size, device="cuda") for _ in range(2)]

    def run():
        torch.matmul(*pair)
        torch.cuda.synchronize()

    found = best_gflops(run, size, repeats)
    pair.clear()
    torch.cuda.empty_cache()  # the memory goes back before JAX takes its share
    return {**found, "device": torch.cuda.get_device_name()}


def measure_peak(size: int | None = None, repeats: int = 10) -> dict:
    """{"jax": ..., "torch": ...}: each framework's measured float32 peak (`jax_peak`,
    `torch_peak`) with products of `size` (default: 8192 on an accelerator, 1024 on the CPU)."""
    import jax

    size = size or (1024 if jax.default_backend() == "cpu" else 8192)
    found = {"torch": torch_peak(size, repeats)}  # first: JAX then takes most of the memory
    found["jax"] = jax_peak(size, repeats)
    return found


def step_share(speed: dict, peak: dict) -> dict:
    """Each framework's training step of `compare.speed` (its JSON) in GFLOP/s, and as a share
    of the measured `peak` of that framework (where one was measured)."""
    shares = {}
    for framework in ("flax", "torch"):
        step_seconds = speed[framework]["step"]["median_ms"] / 1e3
        achieved = speed["train_flops_per_image"] * speed["batch_size"] / step_seconds / 1e9
        measured = (peak.get("jax" if framework == "flax" else "torch") or {}).get("gflops")
        shares[framework] = {"gflops": achieved, "peak_gflops": measured,
                             "share_of_peak": achieved / measured if measured else None}
    return shares


# --- 4. A whole run, split ---------------------------------------------------------------------


class Phases:
    """Seconds per phase: `with phases("compile"): ...` adds the block's time to "compile"."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


PHASES = ("startup", "data", "compile", "init", "plans", "steps", "evaluation", "checkpoints")


def timed_training(config, workdir: Path | None, steps_per_call: int, kernels: str = "auto",
                   spawned_at: float | None = None) -> dict:
    """Train `config` as `flax_impl.train.train` does on all devices (the same functions, the
    same keys: the same metrics), with each phase timed: the imports (from `spawned_at`, the
    wall-clock time the process was started, where given), data loading, each program's
    `.lower(...).compile()`, the initial state, the epoch plans, the train steps, the
    evaluations and, with a `workdir`, the checkpoints. Returns {"phases": {name: seconds},
    "programs": {program: compile seconds}, "history": per-epoch metrics, ...}."""
    phases, started = Phases(), time.perf_counter()
    with phases("startup"):
        import functools

        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        from flax_impl import core
        from flax_impl import train as flax_train
        from flax_impl.common.data import load_mnist
        from flax_impl.common.report import record_epoch
        from flax_impl.extras.compile_cache import use_compilation_cache
        from flax_impl.extras.kernels import get_kernels

        cache = use_compilation_cache()
    if spawned_at is not None:  # the interpreter's own start and the imports before this
        phases.add("startup", max(0.0, time.time() - spawned_at
                                  - (time.perf_counter() - started)))
    with phases("data"):
        data = load_mnist(config.data_source)
        count = config.training_images(len(data.train_images))
        steps = config.steps_per_epoch(count)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        config.check_devices(mesh.size)
        replicated, batches = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        train_data = jax.block_until_ready(jax.device_put(
            (data.train_images[:count], data.train_labels[:count]), replicated))
        eval_data = jax.block_until_ready(jax.device_put(config.evaluation_set(data),
                                                         replicated))
    programs = {}

    def compiled(name: str, jitted, *args):
        with phases("compile"):
            start = time.perf_counter()
            program = jitted.lower(*args).compile()
            programs[name] = time.perf_counter() - start
        return program

    with phases("compile"):
        port = flax_train.create_port(config, config.epochs * steps, get_kernels(kernels))
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    init = compiled("init", jax.jit(port.init, out_shardings=replicated), init_key)
    with phases("init"):
        state = jax.block_until_ready(init(init_key))
    plan = compiled("plan", jax.jit(
        functools.partial(core.epoch_plan, train_key, num_train=count, steps=steps,
                          batch_size=config.batch_size),
        out_shardings=(NamedSharding(mesh, P(None, "data")), replicated)), 1)
    with phases("plans"):
        indices, keys = jax.block_until_ready(plan(1))
    train_chunk = core.make_train_chunk(port.train_step, batches)
    chunks = {}
    for start in range(0, steps, steps_per_call):
        size = min(steps_per_call, steps - start)
        if size not in chunks:
            chunks[size] = compiled(f"train_chunk[{size}]", train_chunk, state, *train_data,
                                    indices[:size], keys[:size])
    evaluate = compiled("evaluate", core.make_evaluate(port.log_probs, config.eval_batch_size,
                                                       batches), state, *eval_data)
    manager = None
    if workdir:
        with phases("checkpoints"):
            manager = flax_train.checkpoint_manager(Path(workdir))
    history = []
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        if epoch > 1:
            with phases("plans"):
                indices, keys = jax.block_until_ready(plan(epoch))
        loss_sum = 0.0
        with phases("steps"):
            for start in range(0, steps, steps_per_call):
                end = min(start + steps_per_call, steps)
                state, metrics = chunks[end - start](state, *train_data, indices[start:end],
                                                     keys[start:end])
                loss_sum += float(metrics["loss"].sum())  # the loop's host sync, as the product's
        with phases("evaluation"):
            eval_loss, correct = evaluate(state, *eval_data)
            eval_loss, correct = float(eval_loss), int(correct)
        record_epoch(history, epoch, loss_sum / steps, eval_loss / len(eval_data[1]), correct,
                     len(eval_data[1]), time.perf_counter() - epoch_started, config.eval_split)
        with phases("checkpoints"):
            flax_train.save_checkpoint(manager, epoch * steps, state,
                                       flax_train.Progress(epoch + 1, 0, 0.0, list(history)))
    if manager:
        with phases("checkpoints"):
            manager.close()
    return {"phases": {name: phases.seconds.get(name, 0.0) for name in PHASES},
            "programs": programs, "seconds": time.perf_counter() - started,
            "epochs": config.epochs, "steps_per_epoch": steps, "steps_per_call": steps_per_call,
            "devices": [str(d) for d in mesh.devices.flat], "compilation_cache":
            str(cache) if cache else None, "recipe": config.recipe, "model": config.model,
            "history": history}


def phase_split(timed: dict, whole_seconds: float) -> dict:
    """The phases of a `timed_training` whose process took `whole_seconds`, with "other": what
    no phase holds (the host's loop, the process's exit), in seconds and as shares."""
    seconds = dict(timed["phases"])
    seconds["other"] = max(0.0, whole_seconds - sum(seconds.values()))
    return {"seconds": seconds, "whole_seconds": whole_seconds,
            "shares": {name: value / whole_seconds for name, value in seconds.items()}}


def phase_line(split: dict, timed: dict) -> str:
    """One line: the recipe and epochs, then each phase's seconds."""
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in split["seconds"].items())
    epochs = timed["epochs"]
    return (f"a whole run of the {timed['recipe']} recipe, {epochs} epoch{'s' * (epochs != 1)} "
            f"of {timed['steps_per_epoch']} steps: {split['whole_seconds']:.1f} s = {parts}")


# --- 5. Time to 99.4 % -------------------------------------------------------------------------


def time_to_target(metrics: list[dict]) -> dict:
    """The first epoch at >= 99.4 % test accuracy and the training seconds up to it (the
    per-epoch "seconds" summed, as `compare.accuracy` counts them); None for both where no
    epoch reaches it."""
    return {"epoch": first_epoch_at_target(metrics), "seconds": seconds_to_target(metrics),
            "final_accuracy": metrics[-1]["test_accuracy"] if metrics else None,
            "epochs": len(metrics)}


def target_line(framework: str, found: dict) -> str:
    """'flax: 99.4 % at epoch 2, after 3.1 s of training' or why not."""
    if found["epoch"] is not None:
        return (f"{framework}: {100 * TARGET:.1f} % at epoch {found['epoch']}, after "
                f"{found['seconds']:.1f} s of training")
    final = "no epoch" if found["final_accuracy"] is None else \
        f"{found['epochs']} epoch(s), final {100 * found['final_accuracy']:.2f} %"
    return f"{framework}: {100 * TARGET:.1f} % not reached ({final})"


# --- The orchestration -------------------------------------------------------------------------


def run_step(step: Step, argv: list[str], limit: float, out: Path, env: dict) -> dict:
    """Run `python argv`, its output appended to DIR's log; its exit status ("timeout" past
    `limit` seconds) and seconds."""
    start = time.perf_counter()
    with open(out / step.log, "a+b") as log:
        if log.tell():  # after another step's output: on a line of its own
            log.seek(-1, os.SEEK_END)
            log.write(b"" if log.read(1) == b"\n" else b"\n")
        log.write(f"== {step.name}: python {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            code = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                  env={**env, SPAWNED_AT: repr(time.time())},
                                  timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    print(f"{step.name}: exit {code} in {seconds:.0f} s ({step.log})", flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "limit": round(limit)}


def training_record(workdir: Path) -> dict:
    """What a training step left in its workdir: the config's recipe, model and epochs, and the
    per-epoch metrics (empty where the run wrote none)."""
    try:
        recorded = workdir_record(workdir)
    except WorkdirError:  # the step failed before writing one
        recorded = {}
    return {"config": {key: recorded.get(key) for key in ("recipe", "model", "epochs")},
            "metrics": read_metrics(workdir / "metrics.jsonl")}


def read_result(path: Path) -> dict | None:
    """A step's JSON result file; None where the step left none."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def derived(summary: dict) -> list[str]:
    """Fill in the summary's figures that join steps (the speed shares of the peak, the phase
    split, the time to 99.4 %); the lines that report them."""
    steps, lines = summary["steps"], []
    peak = steps.get("peak", {}).get("result")
    if peak:
        summary["peak"] = peak
        lines.append("peak, float32 matrix product at full precision: " + "; ".join(
            f"{name} {found['gflops']:,.0f} GFLOP/s on {found['device']}"
            for name, found in peak.items() if found))
    speed = steps.get("speed", {}).get("result")
    if speed:
        summary["speed_share"] = step_share(speed, peak or {})
        lines.append("training step: " + "; ".join(
            f"{name} {found['gflops']:,.1f} GFLOP/s" + (
                f" = {100 * found['share_of_peak']:.1f} % of the measured "
                f"{found['peak_gflops']:,.0f} GFLOP/s peak" if found["share_of_peak"] else "")
            for name, found in summary["speed_share"].items()))
    timed = steps.get("phases", {}).get("result")
    if timed:
        summary["phase_split"] = phase_split(timed, steps["phases"]["seconds"])
        lines.append(phase_line(summary["phase_split"], timed))
    targets = {framework: time_to_target(steps[f"{framework}_fast"]["metrics"])
               for framework in ("flax", "torch") if f"{framework}_fast" in steps}
    if targets:
        summary["time_to_99_4"] = targets
        lines.append("fast recipe to 99.4 %: " + "; ".join(
            target_line(framework, found) for framework, found in targets.items()))
    return lines


def run_steps(steps: list[Step], quick: bool, data_source: str, out: Path, work: Path,
              env: dict, deadline: float, summary: dict) -> None:
    """Run `steps` in order into `summary["steps"]` (written to DIR/summary.json after each);
    a step with less than MIN_STEP_SECONDS left before `deadline` is skipped."""
    for step in steps:
        left = deadline - time.perf_counter()
        if left < MIN_STEP_SECONDS:
            summary["steps"][step.name] = {"exit": "skipped", "seconds": 0.0,
                                           "limit": round(max(left, 0))}
            print(f"{step.name}: skipped, {max(left, 0):.0f} s left of the check's "
                  f"{TOTAL_SECONDS} s", flush=True)
        else:
            fill = {"out": out, "work": work, "data": data_source}
            argv = [part.format(**fill) for part in step.argv]
            argv += list(step.quick if quick else step.full)
            step_env = {**env, **{k: v.format(**fill) for k, v in step.env}}
            summary["steps"][step.name] = run_step(step, argv, min(step.limit, left), out,
                                                   step_env)
            if step.workdir:
                summary["steps"][step.name].update(
                    training_record(Path(step.workdir.format(**fill))))
            if step.result:
                summary["steps"][step.name]["result"] = read_result(
                    Path(step.result.format(**fill)))
        write_json(out / "summary.json", summary)


def write_json(path: Path, record) -> None:
    """`record` as indented JSON in `path`, through a temporary file and a rename."""
    write_output(path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))


def child_main(args: argparse.Namespace, rest: list[str]) -> int:
    """The steps that run this module in a child: `--peak-json` and `--phases-json`."""
    if args.peak_json:
        found = measure_peak(args.peak_size)
        print(json.dumps(found, indent=2))
        write_json(args.peak_json, found)
        return 0
    from flax_impl.common.config import build_parser, config_from_args

    parser = build_parser("python -m compare.gpu_check --phases-json FILE",
                          "a timed training", "flax")
    train_args = parser.parse_args([*rest, "--data-source", args.data_source])
    spawned = os.environ.get(SPAWNED_AT)
    timed = timed_training(config_from_args(train_args), train_args.workdir,
                           train_args.steps_per_call, train_args.kernels,
                           float(spawned) if spawned else None)
    print(json.dumps({k: v for k, v in timed.items() if k != "history"}, indent=2))
    write_json(args.phases_json, timed)
    return 0


def main(argv: list[str] | None = None, steps: tuple[Step, ...] | None = None) -> int:
    """Command-line entry point; `steps`: the steps to choose from (default: STEPS)."""
    steps = STEPS if steps is None else steps
    parser = OneLineParser(prog="python -m compare.gpu_check", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)  # the phases step passes on the rest
    parser.add_argument("--out", type=Path, help="where the files go (default: "
                        "results/gpu/<card>)")
    parser.add_argument("--mnist-gz", type=Path, help="a gzipped MNIST cache to use")
    parser.add_argument("--pack", type=Path, metavar="FILE",
                        help="only write this machine's MNIST cache, gzipped, to FILE")
    parser.add_argument("--data-source", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of each step")
    parser.add_argument("--steps", default=",".join(step.name for step in steps),
                        help="the steps to run, comma-separated (default: all, in order)")
    parser.add_argument("--peak-json", type=Path, help=argparse.SUPPRESS)  # the peak step
    parser.add_argument("--peak-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phases-json", type=Path, help=argparse.SUPPRESS)  # the phases step
    args, rest = parser.parse_known_args(argv)
    if args.peak_json or args.phases_json:
        return child_main(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.pack:
        pack_cache(args.pack)
        return 0
    known = {step.name: step for step in steps}
    chosen = args.steps.split(",")
    if unknown := [name for name in chosen if name not in known]:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    deadline = time.perf_counter() + TOTAL_SECONDS
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    found = devices(env)
    out = args.out or Path("results/gpu") / card_name(found)
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:  # each log of a step run holds this check's output alone
        (out / known[name].log).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.mnist_gz:
        unpack_cache(args.mnist_gz, work / "cache")
        env["MNIST20K_CACHE"] = str(work / "cache")
    print(json.dumps(found, indent=2), flush=True)
    summary = {"devices": found, "quick": args.quick, "steps": {}}
    try:
        run_steps([known[name] for name in chosen], args.quick, args.data_source, out, work,
                  env, deadline, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = derived(summary)
    write_json(out / "summary.json", summary)
    print("\n".join(lines))
    failed = [n for n, step in summary["steps"].items() if step["exit"] != 0]
    print(f"wrote {out}; " + (f"failed or skipped: {', '.join(failed)}" if failed
                              else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
