"""Flax vs torch accuracy, per epoch and per seed: `python -m compare.accuracy [--recipe R]`.

Reads a recipe's committed training results (`results/<framework>/seed*.jsonl` for the default
recipe, `results/<recipe>/<framework>/seed*.jsonl` for the others, each a run's metrics.jsonl) or,
with `--run`, trains them first, one process at a time (each run's log and config beside its
metrics, and the whole process's seconds in whole_process.txt). Prints mean ± std per epoch and
the final epoch per seed, checks that every run's final-epoch test accuracy is >= 99.4 %, and
draws both frameworks' test accuracy and loss curves into a PNG. Then the time to 99.4 % of every
recipe with results: epochs and seconds to the first epoch at >= 99.4 %, and the whole process's
seconds where `--run` recorded them. Exit 1 if a run of `--recipe` misses the target.

`--time-command N` times instead the bare training commands (no workdir, so no checkpoints) of
`--recipe`, Flax and torch alternating, N rounds, and appends the whole-process seconds and final
accuracy of each to RESULTS/command_time.txt. With `--cold`, each round's Flax command runs twice
on a new, empty compilation cache (`MNIST20K_JAX_CACHE`): cold, compiling everything, then warm;
torch, which has no such cache, once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare.host import machine_line
from flax_impl.common.atomic import write_output
from flax_impl.common.config import RECIPES, OneLineParser
from flax_impl.common.errors import ConfigError, WorkdirError, first_line
from flax_impl.common.workdir import read_metrics

FRAMEWORKS = {"flax": "flax_impl.train", "torch": "torch_ref.train"}
TARGET = 0.994
WHOLE_PROCESS = "whole_process.txt"  # written by run_training
COMMAND_TIME = "command_time.txt"  # written by time_commands


def recipe_results(recipe: str, root: Path = Path("results")) -> Path:
    """Where a recipe's runs are kept: `root` for the default recipe, `root/<recipe>` else."""
    return root if recipe == "default" else root / recipe


def load_runs(results: Path) -> dict[str, dict[int, list[dict]]]:
    """{framework: {seed: metrics}} from results/<framework>/seed<N>.jsonl."""
    runs = {}
    for framework in FRAMEWORKS:
        files = sorted((results / framework).glob("seed*.jsonl"))
        runs[framework] = {int(f.stem.removeprefix("seed")): checked_runs(f) for f in files
                           if f.stem.removeprefix("seed").isdigit()}
    return runs


def checked_runs(path: Path) -> list[dict]:
    """The records of a training's metrics file, each with the numbers this command reads
    (WorkdirError naming the first that lacks one)."""
    records = read_metrics(path)
    for number, record in enumerate(records, start=1):
        for key in ("epoch", "test_accuracy", "test_loss", "seconds"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise WorkdirError(f"{path}: line {number} has no number {key!r} (it has "
                                   f"{value!r}); use the metrics.jsonl a training wrote")
    return records


def run_training(results: Path, seeds: list[int], epochs: int | None,
                 recipe: str = "default") -> None:
    """Train every framework and seed with `recipe` (for `epochs`, default the recipe's), one
    process at a time, each with a workdir of its own; keep in `results/<framework>/` each run's
    seed<N>.jsonl (metrics), seed<N>.config.json and seed<N>.log, and append the whole process's
    wall-clock seconds (start-up, data, compilation, checkpoints) to `results/whole_process.txt`.
    """
    results.mkdir(parents=True, exist_ok=True)
    with open(results / WHOLE_PROCESS, "a") as wall:
        wall.write(machine_line(f"recipe {recipe}"))
    for framework, module in FRAMEWORKS.items():
        (results / framework).mkdir(exist_ok=True)
        for seed in seeds:
            kept = results / framework / f"seed{seed}"
            with tempfile.TemporaryDirectory() as work, open(f"{kept}.log", "w") as log:
                workdir = Path(work) / "run"
                start = time.perf_counter()
                code = subprocess.run(
                    [sys.executable, "-m", module, "--recipe", recipe, "--seed", str(seed),
                     *(["--epochs", str(epochs)] if epochs else []), "--workdir", str(workdir)],
                    stdout=log, stderr=subprocess.STDOUT).returncode
                seconds = time.perf_counter() - start
                if code != 0:
                    raise SystemExit(f"error: {module} --recipe {recipe} --seed {seed} failed "
                                     f"(exit {code}); its output: {kept}.log")
                shutil.copy(workdir / "metrics.jsonl", f"{kept}.jsonl")
                shutil.copy(workdir / "config.json", f"{kept}.config.json")
            final = read_metrics(Path(f"{kept}.jsonl"))[-1]["test_accuracy"]
            line = f"{framework} seed{seed} {seconds:.1f} s  final test accuracy {100 * final:.2f}%"
            print(line, flush=True)
            with open(results / WHOLE_PROCESS, "a") as wall:
                wall.write(line + "\n")


def time_commands(results: Path, recipe: str, rounds: int, cold: bool = False) -> list[str]:
    """Run `python -m <trainer> --recipe <recipe>` of each framework, alternating, `rounds`
    times (with `cold`: Flax cold then warm on a new compilation cache, see the module
    docstring); append each one's whole-process seconds and final accuracy line to
    results/command_time.txt; those lines."""
    results.mkdir(parents=True, exist_ok=True)
    setting = ", Flax cold then warm on a new compilation cache" if cold else ""
    with open(results / COMMAND_TIME, "a") as out:
        out.write(machine_line(f"python -m {{flax_impl,torch_ref}}.train --recipe {recipe}"
                               f"{setting}"))
    lines = []
    for round_ in range(1, rounds + 1):
        with tempfile.TemporaryDirectory() as cache:
            runs = [("flax_cold", FRAMEWORKS["flax"]), ("flax_warm", FRAMEWORKS["flax"]),
                    ("torch", FRAMEWORKS["torch"])] if cold else list(FRAMEWORKS.items())
            for name, module in runs:
                env = {**os.environ, "MNIST20K_JAX_CACHE": cache} if cold and \
                    name.startswith("flax") else None
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", module, "--recipe", recipe],
                                      capture_output=True, text=True, env=env)
                seconds = time.perf_counter() - start
                final = [line for line in done.stdout.splitlines() if line.startswith("Done:")]
                outcome = final[-1] if done.returncode == 0 and final else \
                    f"FAILED (exit {done.returncode})"
                lines.append(f"{name} round{round_} {seconds:.1f} s  {outcome}")
                print(lines[-1], flush=True)
                with open(results / COMMAND_TIME, "a") as out:
                    out.write(lines[-1] + "\n")
    return lines


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def first_epoch_at_target(metrics: list[dict]) -> int | None:
    return next((m["epoch"] for m in metrics if m["test_accuracy"] >= TARGET), None)


def seconds_to_target(metrics: list[dict]) -> float | None:
    """Wall-clock seconds of the epochs (training, its compilation, evaluation) up to the first
    at >= 99.4 %."""
    epoch = first_epoch_at_target(metrics)
    return None if epoch is None else sum(m["seconds"] for m in metrics[:epoch])


def whole_process_seconds(results: Path) -> dict[tuple[str, int], float]:
    """{(framework, seed): seconds} of whole training processes, from `results`'s
    whole_process.txt (lines `flax seed0 41.2 s ...`; the last line of a run counts)."""
    path = results / WHOLE_PROCESS
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] in FRAMEWORKS and words[3] == "s":
                found[words[0], int(words[1].removeprefix("seed"))] = float(words[2])
    return found


def median_or_dash(values: list[float], form: str) -> str:
    """The median formatted with `form`, or "-" for no values."""
    return format(statistics.median(values), form) if values else "-"


def time_to_accuracy(recipes: dict[str, Path]) -> str:
    """One row per recipe and framework with runs in its folder: final accuracy, runs at
    >= 99.4 %, and the median epochs and seconds to the first epoch at >= 99.4 %."""
    lines = ["Time to 99.4 % test accuracy (medians over the runs; s: seconds)",
             f"{'recipe':>8}  {'framework':>9}  {'runs':>4}  {'final mean':>10}  {'min':>5}  "
             f"{'>= 99.4':>7}  {'epoch':>5}  {'s to 99.4':>9}  {'whole process':>13}"]
    for recipe, results in recipes.items():
        wall = whole_process_seconds(results)
        for framework, seeds in load_runs(results).items():
            if not seeds:
                continue
            finals = [m[-1]["test_accuracy"] for m in seeds.values()]
            reached = [m for m in seeds.values() if first_epoch_at_target(m)]
            epochs = [first_epoch_at_target(m) for m in reached]
            seconds = [seconds_to_target(m) for m in reached]
            whole = [wall[framework, s] for s in seeds if (framework, s) in wall]
            lines.append(
                f"{recipe:>8}  {framework:>9}  {len(seeds):>4}  "
                f"{100 * statistics.mean(finals):>10.2f}  {100 * min(finals):>5.2f}  "
                f"{sum(f >= TARGET for f in finals):>3}/{len(finals):<3}  "
                f"{median_or_dash(epochs, '.0f'):>5}  {median_or_dash(seconds, '.0f'):>9}  "
                f"{median_or_dash(whole, '.0f'):>13}")
    return "\n".join(lines)


def summary(runs: dict) -> tuple[str, bool]:
    """The per-epoch and per-seed tables, and whether every run meets the target."""
    lines = ["Test accuracy (%) per epoch, mean ± std over seeds",
             f"{'epoch':>5}  {'flax':>14}  {'torch':>14}  {'gap (flax-torch)':>17}"]
    epochs = min(len(m) for framework in runs.values() for m in framework.values())
    for e in range(epochs):
        per = {fw: [m[e]["test_accuracy"] for m in seeds.values()] for fw, seeds in runs.items()}
        gap = statistics.mean(per["flax"]) - statistics.mean(per["torch"])
        lines.append(f"{e + 1:>5}  {mean_std(per['flax']):>14}  {mean_std(per['torch']):>14}  "
                     f"{100 * gap:>+17.2f}")
    lines += ["", "Final epoch per run",
              f"{'framework':>9}  {'seed':>4}  {'accuracy':>8}  {'first >= 99.4':>13}  "
              f"{'s to 99.4':>9}  {'s/epoch':>7}  {'verdict':>7}"]
    ok = True
    for framework, seeds in runs.items():
        finals = []
        for seed, metrics in sorted(seeds.items()):
            final = metrics[-1]["test_accuracy"]
            finals.append(final)
            ok &= final >= TARGET
            per_epoch = statistics.mean(m["seconds"] for m in metrics)
            to_target = seconds_to_target(metrics)
            lines.append(f"{framework:>9}  {seed:>4}  {100 * final:>8.2f}  "
                         f"{first_epoch_at_target(metrics) or '-':>13}  "
                         f"{'-' if to_target is None else f'{to_target:.0f}':>9}  "
                         f"{per_epoch:>7.1f}  {'PASS' if final >= TARGET else 'FAIL':>7}")
        lines.append(f"{framework:>9}  {'all':>4}  {mean_std(finals):>8}  min "
                     f"{100 * min(finals):.2f}")
    lines.append(f"verdict: {'every run' if ok else 'NOT every run'} ends at >= 99.4 %")
    return "\n".join(lines), ok


def plot(runs: dict, path: Path) -> None:
    """Test accuracy and test loss per epoch, every run of both frameworks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, (framework, seeds) in zip(("C0", "C1"), runs.items(), strict=True):
        for index, (_seed, metrics) in enumerate(sorted(seeds.items())):
            epochs = [m["epoch"] for m in metrics]
            label = framework if index == 0 else None
            accuracy_axis.plot(epochs, [100 * m["test_accuracy"] for m in metrics], "o-",
                               color=color, alpha=0.7, markersize=3, label=label)
            loss_axis.plot(epochs, [m["test_loss"] for m in metrics], "o-", color=color,
                           alpha=0.7, markersize=3, label=label)
    accuracy_axis.axhline(100 * TARGET, color="grey", linestyle="--", label="99.4 %")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(98.5, 99.8),
                      title="Test accuracy (each line one seed)")
    loss_axis.set(xlabel="epoch", ylabel="test NLL loss", yscale="log", title="Test loss")
    accuracy_axis.legend()
    loss_axis.legend()
    figure.tight_layout()
    write_output(path, lambda file: figure.savefig(file, dpi=100, format="png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = OneLineParser(prog="python -m compare.accuracy", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="the recipe whose runs are read (or trained with --run)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where the runs are (default: results for the default recipe, "
                             "results/<recipe> for the others)")
    parser.add_argument("--run", action="store_true",
                        help="train every seed first, one at a time (the default recipe: 20 "
                             "epochs per seed and framework)")
    parser.add_argument("--time-command", type=int, metavar="ROUNDS", default=None,
                        help="time the bare training commands of --recipe instead, ROUNDS rounds")
    parser.add_argument("--cold", action="store_true",
                        help="with --time-command: each round's Flax command cold (a new, empty "
                             "compilation cache), then warm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--png", type=Path, default=None,
                        help="where the curves go (default: RESULTS/accuracy.png)")
    args = parser.parse_args(argv)
    results = args.results or recipe_results(args.recipe)
    if args.time_command is not None:
        if args.time_command <= 0:
            parser.error(f"--time-command must be > 0, got {args.time_command}")
        lines = time_commands(results, args.recipe, args.time_command, args.cold)
        return 0 if all("FAILED" not in line for line in lines) else 1
    if args.run:
        run_training(results, args.seeds, args.epochs, args.recipe)
    try:
        runs = load_runs(results)
    except WorkdirError as error:  # a malformed metrics file
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = [fw for fw, seeds in runs.items() if not seeds]
    if missing:
        print(f"error: no results for {', '.join(missing)} in {results}/<framework>/"
              f"seed*.jsonl; train first or pass --run", file=sys.stderr)
        return 2
    text, ok = summary(runs)
    print(text)
    png = args.png or results / "accuracy.png"
    try:
        plot(runs, png)
    except (ConfigError, OSError) as error:
        print(f"error: cannot write {png}: {first_line(error)}", file=sys.stderr)
        return 2
    print(f"Wrote {png}\n")
    # Every recipe's runs, beside each other (with --results: that folder's recipe alone).
    recipes = {args.recipe: results} if args.results else {
        recipe: recipe_results(recipe) for recipe in RECIPES}
    print(time_to_accuracy(recipes))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
