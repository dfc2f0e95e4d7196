"""A recipe sweep on the validation split: `python -m compare.sweep --out FILE` (see --help).

Trains each variant (a set of `flax_impl.train` flags, VARIANTS) for each seed with
`--validation 10000`, several training processes at once, and appends one line per finished run
to --out: `variant seedS FLAGS :: <its last "Validation set:" line> :: <seconds> s`. The test set
is never scored: a recipe is chosen here and confirmed on the test set by `compare.accuracy`.
The processes share JAX's persistent compilation cache, so every seed after a variant's first
reuses its compiled step; on a GPU many small runs share the device.
`--framework torch` trains with `torch_ref.train` instead (its lines name the variant
`NAME@torch`). `--summary FILE [FILE ...]` prints each variant's runs, mean, min and count
>= 99.40 % instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flax_impl.common.atomic import write_output
from flax_impl.common.config import OneLineParser
from flax_impl.common.errors import ConfigError, first_line

TRAINERS = {"flax": "flax_impl.train", "torch": "torch_ref.train"}  # each run: `python -m` it

# The searches of docs/recipes.md: variants of the default recipe at 3 epochs, then other widths
# under 20k parameters (`--widths`), then the fast recipe's neighbours on the CPU. The first sweep
# also ran three variants with a moving average of the weights (`--ema-decay`); the moving average
# left the project (it did not pay), their results stay in docs/recipes.md.
THREE_EPOCHS = "--epochs 3 --dropout 0"
FAST_V1 = f"--model widenet {THREE_EPOCHS} --lr 0.2 --label-smoothing 0.1"  # the first fast recipe
VARIANTS = {
    "default3": "--epochs 3",  # the default recipe (dropout 0.05, batch 128) squeezed
    "b128": THREE_EPOCHS,
    "b128_lr02": f"{THREE_EPOCHS} --lr 0.2",
    "b256_lr04": f"{THREE_EPOCHS} --batch-size 256 --lr 0.4",
    "b64": f"{THREE_EPOCHS} --batch-size 64",
    "b64_ls": f"{THREE_EPOCHS} --batch-size 64 --label-smoothing 0.1",
    "b64_lr02": f"{THREE_EPOCHS} --batch-size 64 --lr 0.2",
    "b64_lr005": f"{THREE_EPOCHS} --batch-size 64 --lr 0.05",
    "b64_norot": f"{THREE_EPOCHS} --batch-size 64 --max-rotation 0",
    "b64_rot12": f"{THREE_EPOCHS} --batch-size 64 --max-rotation 12",
    "b64_warm02": f"{THREE_EPOCHS} --batch-size 64 --warmup-fraction 0.2",
    "b32_lr005": f"{THREE_EPOCHS} --batch-size 32 --lr 0.05",
    "wide_b64": f"--widths 10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 64",  # 19,816 params
    # Second sweep: other shapes under 20k (more channels early: more FLOPs, few parameters).
    "wide_b64_ls": f"--widths 10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 64 "
                   f"--label-smoothing 0.1",
    "wide_b256_lr04": f"--widths 10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 256 --lr 0.4",
    "b256_lr04_ls": f"{THREE_EPOCHS} --batch-size 256 --lr 0.4 --label-smoothing 0.1",
    "w16_16_20_20_20_32_b64": f"--widths 16,16,20,20,20,32 {THREE_EPOCHS} --batch-size 64",
    "w12_16_20_24_24_24_b64": f"--widths 12,16,20,24,24,24 {THREE_EPOCHS} --batch-size 64",
    "w12_20_20_20_24_24_b64": f"--widths 12,20,20,20,24,24 {THREE_EPOCHS} --batch-size 64",
    "w10_14_20_24_24_28_b64": f"--widths 10,14,20,24,24,28 {THREE_EPOCHS} --batch-size 64",
    # Third, on the CPU: wide_b64_ls at batch 128, half the steps, the peak rate scaled with
    # the batch (b128_lr02 and b256_lr04 matched b64 over 12 seeds): a faster CPU epoch.
    "wide_b128_lr02_ls": f"--widths 10,16,20,20,24,32 {THREE_EPOCHS} --lr 0.2 "
                         f"--label-smoothing 0.1",
    # The stretch goal: the fast recipe in 2 epochs.
    "fast_2epochs": "--recipe fast --epochs 2",
    # Fourth, on the CPU: the first fast recipe (wide_b128_lr02_ls) and its neighbours, for
    # margin on every seed.
    "fast": FAST_V1,
    "fast_wd1e4": f"{FAST_V1} --weight-decay 1e-4",
    "fast_wd1e3": f"{FAST_V1} --weight-decay 1e-3",
    "fast_ls02": f"{FAST_V1} --label-smoothing 0.2",
    "fast_lr03": f"{FAST_V1} --lr 0.3",
    "fast_b64": f"{FAST_V1} --batch-size 64 --lr 0.1",
    "fast_lr04": f"{FAST_V1} --lr 0.4",
    "fast_lr06": f"{FAST_V1} --lr 0.6",
    # Fifth, on the CPU: networks under 5,000 parameters, 20 epochs, no dropout (TinyNet's
    # recipe), in SepNet's layout at three widths (results/sepnet/sweep*_cpu.txt ran them, and
    # other layouts, as entries of the model table: docs/recipes.md).
    "sep_d": "--model sepnet --widths 8,12,16,16,20,24,24 --dropout 0",  # 3,538 parameters
    "sep_d1": "--model sepnet --dropout 0",  # 4,710: SepNet
    "sep_d4": "--model sepnet --widths 10,16,20,20,24,28,32 --dropout 0",  # 4,946
    # Sixth, on the CPU in torch (the framework whose runs missed): SepNet's recipe, stronger
    # rotation or twice the peak rate, and Xception's separable convolutions, wider (4,858).
    "sep_rot12": "--recipe sepnet --max-rotation 12",
    "sep_lr02": "--recipe sepnet --lr 0.2",
    "xsepnet": "--recipe xsepnet",
}
FIRST_SWEEP = ",".join(list(VARIANTS)[:list(VARIANTS).index("wide_b64") + 1])
MARGIN_SWEEP = "fast,fast_wd1e4,fast_wd1e3,fast_ls02,fast_lr03,fast_b64,fast_lr04,fast_lr06"
SECOND_SWEEP = ("wide_b64_ls,wide_b256_lr04,b256_lr04_ls,w16_16_20_20_20_32_b64,"
                "w12_16_20_24_24_24_b64,w12_20_20_20_24_24_b64,w10_14_20_24_24_28_b64")


def command(flags: str, seed: int, extra: str = "", framework: str = "flax") -> list[str]:
    """The training command of one run: the variant's flags, the validation split, the seed."""
    return [sys.executable, "-m", TRAINERS[framework], *shlex.split(flags), "--validation",
            "10000", "--seed", str(seed), *shlex.split(extra)]


def run(name: str, seed: int, flags: str, extra: str, env: dict, framework: str = "flax") -> str:
    """Train one variant for one seed; its result line."""
    start = time.perf_counter()
    result = subprocess.run(command(flags, seed, extra, framework), capture_output=True,
                            text=True, env=env)
    name = name if framework == "flax" else f"{name}@{framework}"
    scored = [line for line in result.stdout.splitlines() if line.startswith("Validation set:")]
    outcome = scored[-1] if result.returncode == 0 and scored else \
        f"FAILED (exit {result.returncode}): {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    return f"{name} seed{seed} {flags} :: {outcome} :: {time.perf_counter() - start:.0f} s"


def seed_range(text: str) -> list[int]:
    """'0-9' or '0,3,5' -> the seeds."""
    try:
        if "-" in text:
            first, last = text.split("-")
            return list(range(int(first), int(last) + 1))
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are FIRST-LAST or a comma-separated list, "
                                         f"got {text!r}") from None


RESULT_LINE = re.compile(r"(\S+) seed(\d+) .*Validation set: .*\((\d+\.\d+)%\)")


def summary(paths: list[str], target: float = 99.40) -> str:
    """Per variant, over the result lines of `paths` (a later line of a seed replaces an earlier
    one): runs, mean, min and how many reached `target` %, best mean first."""
    runs: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path) as lines:
            for match in filter(None, map(RESULT_LINE.match, lines)):
                runs.setdefault(match[1], {})[int(match[2])] = float(match[3])
    rows = sorted(runs.items(), key=lambda item: -statistics.mean(item[1].values()))
    width = max([len("variant"), *map(len, runs)])
    table = [f"{'variant':<{width}}  runs  mean %   min %  >= {target:.2f} %   seeds"]
    for name, accuracies in rows:
        values, seeds = list(accuracies.values()), sorted(accuracies)
        contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
        table.append(f"{name:<{width}}  {len(values):>4}  {statistics.mean(values):6.3f}  "
                     f"{min(values):6.2f}  {sum(v >= target for v in values):>4} / {len(values):<4}"
                     f"  {f'{seeds[0]}-{seeds[-1]}' if contiguous else ','.join(map(str, seeds))}")
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = OneLineParser(prog="python -m compare.sweep", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the file the result lines are appended to")
    parser.add_argument("--summary", nargs="+", metavar="FILE",
                        help="summarise these result files (runs nothing)")
    parser.add_argument("--seeds", type=seed_range, default="0-9", help="e.g. 0-9 or 0,3,5")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                        help="training processes at once")
    parser.add_argument("--variants", default=FIRST_SWEEP,
                        help=f"comma-separated names, or 'second' or 'margin' (default: the first "
                             f"sweep's); "
                             f"one of {', '.join(VARIANTS)}")
    parser.add_argument("--extra", default="", help="flags added to every run (smoke tests)")
    parser.add_argument("--framework", choices=TRAINERS, default="flax",
                        help="whose trainer runs (default: flax)")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if not args.out:
        parser.error("--out FILE is required (or --summary FILE ...)")
    names = {"second": SECOND_SWEEP, "margin": MARGIN_SWEEP}.get(args.variants,
                                                                 args.variants).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.parallel <= 0:
        parser.error(f"--parallel must be > 0, got {args.parallel}")
    out = Path(args.out)

    def append(text: str) -> None:  # the whole file rewritten, through a rename
        kept = out.read_bytes() if out.is_file() else b""
        write_output(out, lambda file: file.write(kept + text.encode()))

    try:
        append("")  # a file that cannot be written is said now, not after hours of training
    except (ConfigError, OSError) as error:
        print(f"error: cannot write {out}: {first_line(error)}", file=sys.stderr)
        return 2
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.environ.get(
                   "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               # torch's threads share the cores among the runs at once
               OMP_NUM_THREADS=os.environ.get(
                   "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel))))
    lock = threading.Lock()

    def job(name: str, seed: int) -> None:
        line = run(name, seed, VARIANTS[name], args.extra, env, args.framework)
        with lock:
            append(line + "\n")
        print(line, flush=True)

    # Seed-major: whatever finishes before a time limit covers every variant evenly.
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(job, name, seed) for seed in args.seeds for name in names]:
            future.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
