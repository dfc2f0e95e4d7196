"""Recipe variants over many seeds on the validation split, several training processes at once.

Each run is `python -m flax_impl.train --validation 10000 --seed S FLAGS` (a `widths=` variant goes
through results/tinynet/explore_widths.py); one line per finished run is appended to --out:
`variant seedS FLAGS :: <its last "Validation set:" line> :: <seconds> s`. The test set is never
scored. Made for a lent GPU (many small runs share it; JAX's persistent compilation cache lets
every seed after the first reuse its variant's compiled step), and runs anywhere (`--parallel 1`).

Usage: python results/fast_recipe/sweep.py --out FILE [--seeds 0-9] [--parallel 8]
       [--variants b64,b64_ls | --variants second] [--extra "--train-examples 2000"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

THREE_EPOCHS = "--epochs 3 --dropout 0"
VARIANTS = {
    "default3": "--epochs 3",  # the default recipe (dropout 0.05, batch 128) squeezed
    "b128": THREE_EPOCHS,
    "b128_lr02": f"{THREE_EPOCHS} --lr 0.2",
    "b256_lr04": f"{THREE_EPOCHS} --batch-size 256 --lr 0.4",
    "b64": f"{THREE_EPOCHS} --batch-size 64",
    "b64_ls": f"{THREE_EPOCHS} --batch-size 64 --label-smoothing 0.1",
    "b64_ema": f"{THREE_EPOCHS} --batch-size 64 --ema-decay 0.99",
    "b64_ls_ema": f"{THREE_EPOCHS} --batch-size 64 --label-smoothing 0.1 --ema-decay 0.99",
    "b64_lr02": f"{THREE_EPOCHS} --batch-size 64 --lr 0.2",
    "b64_lr005": f"{THREE_EPOCHS} --batch-size 64 --lr 0.05",
    "b64_norot": f"{THREE_EPOCHS} --batch-size 64 --max-rotation 0",
    "b64_rot12": f"{THREE_EPOCHS} --batch-size 64 --max-rotation 12",
    "b64_warm02": f"{THREE_EPOCHS} --batch-size 64 --warmup-fraction 0.2",
    "b32_lr005": f"{THREE_EPOCHS} --batch-size 32 --lr 0.05",
    "b32_lr005_ls_ema": f"{THREE_EPOCHS} --batch-size 32 --lr 0.05 --label-smoothing 0.1 "
                        f"--ema-decay 0.995",
    "wide_b64": f"widths=10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 64",  # 19,816 params
    # Second sweep: other shapes under 20k (more channels early: more FLOPs, few parameters).
    "wide_b64_ls": f"widths=10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 64 "
                   f"--label-smoothing 0.1",
    "wide_b256_lr04": f"widths=10,16,20,20,24,32 {THREE_EPOCHS} --batch-size 256 --lr 0.4",
    "b256_lr04_ls": f"{THREE_EPOCHS} --batch-size 256 --lr 0.4 --label-smoothing 0.1",
    "w16_16_20_20_20_32_b64": f"widths=16,16,20,20,20,32 {THREE_EPOCHS} --batch-size 64",
    "w12_16_20_24_24_24_b64": f"widths=12,16,20,24,24,24 {THREE_EPOCHS} --batch-size 64",
    "w12_20_20_20_24_24_b64": f"widths=12,20,20,20,24,24 {THREE_EPOCHS} --batch-size 64",
    "w10_14_20_24_24_28_b64": f"widths=10,14,20,24,24,28 {THREE_EPOCHS} --batch-size 64",
    # Third, on the CPU: wide_b64_ls at batch 128, half the steps, the peak rate scaled with
    # the batch (b128_lr02 and b256_lr04 matched b64 over 12 seeds): a faster CPU epoch.
    "wide_b128_lr02_ls": f"widths=10,16,20,20,24,32 {THREE_EPOCHS} --lr 0.2 "
                         f"--label-smoothing 0.1",
    # The stretch goal: the fast recipe in 2 epochs.
    "fast_2epochs": "--recipe fast --epochs 2",
}
SECOND_SWEEP = ("wide_b64_ls,wide_b256_lr04,b256_lr04_ls,w16_16_20_20_20_32_b64,"
                "w12_16_20_24_24_24_b64,w12_20_20_20_24_24_b64,w10_14_20_24_24_28_b64")


def command(flags: str, seed: int, extra: str) -> list[str]:
    """The training command of one run."""
    words = shlex.split(flags) + ["--validation", "10000", "--seed", str(seed)] + \
        shlex.split(extra)
    if words[0].startswith("widths="):
        return [sys.executable, "results/tinynet/explore_widths.py",
                words[0].removeprefix("widths="), *words[1:]]
    return [sys.executable, "-m", "flax_impl.train", *words]


def run(name: str, seed: int, flags: str, extra: str, env: dict) -> str:
    """Train one variant for one seed; its result line."""
    start = time.perf_counter()
    result = subprocess.run(command(flags, seed, extra), capture_output=True, text=True, env=env)
    scored = [line for line in result.stdout.splitlines() if line.startswith("Validation set:")]
    outcome = scored[-1] if result.returncode == 0 and scored else \
        f"FAILED (exit {result.returncode}): {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    return f"{name} seed{seed} {flags} :: {outcome} :: {time.perf_counter() - start:.0f} s"


def seed_range(text: str) -> list[int]:
    """'0-9' or '0,3,5' -> the seeds."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:16]),
                        help="comma-separated names, or 'second' (default: the first sweep's)")
    parser.add_argument("--extra", default="", help="flags added to every run (smoke tests)")
    args = parser.parse_args()
    names = (SECOND_SWEEP if args.variants == "second" else args.variants).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(VARIANTS)}")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.environ.get(
                   "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    lock = threading.Lock()

    def job(name: str, seed: int) -> None:
        line = run(name, seed, VARIANTS[name], args.extra, env)
        with lock, open(args.out, "a") as out:
            out.write(line + "\n")
        print(line, flush=True)

    # Seed-major: whatever finishes before a time limit covers every variant evenly.
    with ThreadPoolExecutor(args.parallel) as pool:
        for seed in seed_range(args.seeds):
            for name in names:
                pool.submit(job, name, seed)


if __name__ == "__main__":
    main()
