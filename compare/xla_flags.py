"""XLA:CPU options, measured in turns: `python -m compare.xla_flags [--flag=--xla_... ...]`.

XLA reads `XLA_FLAGS` once, when the process starts, so each option runs in a process of its
own, beside one without any: all of them build the product's run
(`flax_impl.setup.setup_training`: `--recipe`'s network and batch, the default kernels) and warm up,
then each round times one jitted call of `--steps-per-call` train steps in every process in
turn, so that all see the same machine. Reported per option: the median ms per step, the median
over the rounds of the ratio to the process without options (above 1: the option is faster),
the compile time, the loss after the timed steps (an option that changes the arithmetic changes
it), and whether this XLA still knows the option. With the CPU and its vector extensions. A benchmark:
it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from compare.machine import cpu_flags, machine_line
from flax_impl.common.config import RECIPES

CANDIDATES = [
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_prefer_vector_width=512",  # AVX-512 only
    "--xla_cpu_use_thunk_runtime=false",
]
RETIRED = "is no longer supported"  # what XLA logs for an option it ignores


def default_flags() -> list[str]:
    """The candidates that apply to this CPU (512-bit vectors only with AVX-512)."""
    wide = "avx512f" in cpu_flags()
    return [flag for flag in CANDIDATES if wide or "vector_width=512" not in flag]


def serve_steps(data_source: str, steps_per_call: int, recipe: str = "default") -> None:
    """In a child process: warm up, say so, then time one jitted call of train steps per "go"
    line on stdin (printing ms per step) until "quit" (printing the loss of the last step)."""
    import jax
    import numpy as np

    from compare.speed import FlaxBench
    from flax_impl.common.config import recipe_config
    from flax_impl.common.data import load_mnist

    config = recipe_config(recipe, data_source=data_source)
    bench = FlaxBench(load_mnist(data_source), config, steps_per_call)
    print(json.dumps({"warmup_seconds": bench.warmup_seconds}), flush=True)
    call = 0
    for line in sys.stdin:
        if line.strip() != "go":
            break
        call += 1
        print(json.dumps({"ms": 1e3 * bench.train(call)}), flush=True)
    loss = float(np.asarray(jax.device_get(bench._run(0, 1))["loss"])[-1])
    print(json.dumps({"loss": loss}), flush=True)


class Child:
    """A process timing the train steps with `flag` (or none) in XLA_FLAGS, one call per ask."""

    def __init__(self, flag: str | None, data_source: str, steps_per_call: int,
                 recipe: str = "default"):
        env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                                 flag]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "compare.xla_flags", "--child", "--data-source", data_source,
             "--steps-per-call", str(steps_per_call), "--recipe", recipe],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.warmup_seconds = self._read()["warmup_seconds"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            error = (self.process.stderr.read().strip().splitlines() or ["exited"])[-1]
            raise RuntimeError(error)
        return json.loads(line)

    def time_call(self) -> float:
        """ms per step of one jitted call."""
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self._read()["ms"]

    def finish(self) -> tuple[float, bool]:
        """(the loss of its last step, whether its XLA knew the option)."""
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        loss = self._read()["loss"]
        stderr = self.process.communicate()[1]
        return loss, RETIRED not in stderr


def compare_flags(flags: list[str], rounds: int, data_source: str,
                  steps_per_call: int, recipe: str = "default") -> dict:
    """One process per flag and one without, all warmed up; then `rounds` rounds, each timing one
    call in every process in turn; the summary per flag."""
    names = ["none", *flags]
    children, summary = {}, {}
    for name in names:  # started one after the other: their compilations do not overlap
        try:
            children[name] = Child(None if name == "none" else name, data_source,
                                   steps_per_call, recipe)
        except RuntimeError as error:
            summary[name] = {"error": str(error)}
    times = {name: [] for name in children}
    for _ in range(rounds):
        for name, child in children.items():
            times[name].append(child.time_call())
    for name, child in children.items():
        loss, supported = child.finish()
        ratios = [base / t for base, t in zip(times["none"], times[name], strict=True)]
        summary[name] = {"median_ms": statistics.median(times[name]),
                         "speedup": statistics.median(ratios), "warmup_seconds":
                         child.warmup_seconds, "loss": loss, "supported": supported}
    return {name: summary[name] for name in names}


def report(summary: dict, rounds: int, recipe: str = "default") -> str:
    """The table: one row per option."""
    lines = [f"{'XLA_FLAGS':<48} {'ms/step':>8} {'speed-up':>9} {'compile':>8}  loss after",
             "-" * 90]
    for name, row in summary.items():
        if "error" in row:
            lines.append(f"{name:<48} failed: {row['error']}")
            continue
        note = "" if row["supported"] else "  (this XLA ignores it: no longer supported)"
        lines.append(f"{name:<48} {row['median_ms']:8.1f} {row['speedup']:8.3f}x "
                     f"{row['warmup_seconds']:7.1f}s  {row['loss']:.6f}{note}")
    lines += ["", f"speed-up: the median over {rounds} rounds of (ms/step without options) / "
                  f"(ms/step with the option), the processes timed in turn in each round; "
                  "above 1: the option is faster."]
    command = "python -m compare.xla_flags" + ("" if recipe == "default" else f" --recipe {recipe}")
    return machine_line(command) + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.xla_flags", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flag", action="append", default=None, dest="flags",
                        metavar="=--xla_OPTION=VALUE",
                        help="an XLA_FLAGS option to measure, written --flag=--xla_...; again "
                             "for more (default: the candidates that apply to this CPU)")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per process")
    parser.add_argument("--steps-per-call", type=int, default=39)
    parser.add_argument("--data-source", default="auto")
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="the recipe whose network and batch are timed")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps_per_call) <= 0:
        parser.error("--rounds and --steps-per-call must be > 0")
    if args.child:
        serve_steps(args.data_source, args.steps_per_call, args.recipe)
        return 0
    summary = compare_flags(args.flags or default_flags(), args.rounds, args.data_source,
                            args.steps_per_call, args.recipe)
    print(report(summary, args.rounds, args.recipe))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rounds": args.rounds, "machine": machine_line("compare.xla_flags").strip(),
                       "options": summary},
                      file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
