"""Flax vs torch accuracy, per epoch and per seed: `python -m compare.accuracy`.

Reads the committed training results (`results/flax/seed*.jsonl`, `results/torch/seed*.jsonl`,
each a run's metrics.jsonl) or, with `--run`, trains them first. Prints mean ± std per epoch and
the final epoch per seed, checks that every run's final-epoch test accuracy is >= 99.4 %, and
draws both frameworks' test accuracy and loss curves into a PNG. Exit 1 if a run misses the target.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from flax_impl.config import RECIPES
from flax_impl.reporting import read_metrics

FRAMEWORKS = {"flax": "flax_impl.train", "torch": "torch_ref.train"}
TARGET = 0.994


def load_runs(results: Path) -> dict[str, dict[int, list[dict]]]:
    """{framework: {seed: metrics}} from results/<framework>/seed<N>.jsonl."""
    runs = {}
    for framework in FRAMEWORKS:
        files = sorted((results / framework).glob("seed*.jsonl"))
        runs[framework] = {int(f.stem.removeprefix("seed")): read_metrics(f) for f in files}
    return runs


def run_training(results: Path, seeds: list[int], epochs: int, recipe: str = "default") -> None:
    """Train every framework and seed with `recipe`; copy metrics into `results`."""
    for framework, module in FRAMEWORKS.items():
        for seed in seeds:
            workdir = results / framework / f"workdir_seed{seed}"
            subprocess.run([sys.executable, "-m", module, "--recipe", recipe, "--seed", str(seed),
                            "--epochs", str(epochs), "--workdir", str(workdir), "--overwrite"],
                           check=True)
            shutil.copy(workdir / "metrics.jsonl", results / framework / f"seed{seed}.jsonl")


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def first_epoch_at_target(metrics: list[dict]) -> int | None:
    return next((m["epoch"] for m in metrics if m["test_accuracy"] >= TARGET), None)


def minutes_to_target(metrics: list[dict]) -> float | None:
    """Wall-clock minutes (training + evaluation) until the first epoch at >= 99.4 %."""
    epoch = first_epoch_at_target(metrics)
    return None if epoch is None else sum(m["seconds"] for m in metrics[:epoch]) / 60


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
              f"{'min to 99.4':>11}  {'min/epoch':>9}  {'verdict':>7}"]
    ok = True
    for framework, seeds in runs.items():
        finals = []
        for seed, metrics in sorted(seeds.items()):
            final = metrics[-1]["test_accuracy"]
            finals.append(final)
            ok &= final >= TARGET
            minutes = statistics.mean(m["seconds"] for m in metrics) / 60
            to_target = minutes_to_target(metrics)
            lines.append(f"{framework:>9}  {seed:>4}  {100 * final:>8.2f}  "
                         f"{first_epoch_at_target(metrics) or '-':>13}  "
                         f"{'-' if to_target is None else f'{to_target:.1f}':>11}  "
                         f"{minutes:>9.2f}  {'PASS' if final >= TARGET else 'FAIL':>7}")
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
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--run", action="store_true", help="train every seed first (hours on CPU)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="the recipe --run trains (tinynet: TinyNet's)")
    parser.add_argument("--png", type=Path, default=None,
                        help="where the curves go (default: RESULTS/accuracy.png)")
    args = parser.parse_args(argv)
    if args.run:
        run_training(args.results, args.seeds, args.epochs, args.recipe)
    runs = load_runs(args.results)
    missing = [fw for fw, seeds in runs.items() if not seeds]
    if missing:
        print(f"error: no results for {', '.join(missing)} in {args.results}/<framework>/"
              f"seed*.jsonl; train first or pass --run", file=sys.stderr)
        return 2
    text, ok = summary(runs)
    print(text)
    png = args.png or args.results / "accuracy.png"
    plot(runs, png)
    print(f"Wrote {png}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
