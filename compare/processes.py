"""Two training processes against one on this machine: `python -m compare.processes --out DIR`.

Both frameworks, 2 epochs on the first 12,800 training images with dropout and rotation off
(so 2 processes and 1 compute the same run): Flax as 2 `jax.distributed` processes and as 1,
torch under `torchrun --nproc-per-node 2` and as 1 process. Writes DIR/two_processes.log (every
command's log lines, per-epoch times included) and DIR/<run>.metrics.jsonl. A benchmark: it
prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from compare.machine import machine_line

FLAGS = ["--epochs", "2", "--train-examples", "12800", "--dropout", "0", "--max-rotation", "0"]


def commands(work: Path, port: int, extra: list[str]) -> dict[str, list[list[str]]]:
    """{run: the commands started together for it}."""
    flags = [*FLAGS, *extra]
    flax = [sys.executable, "-m", "flax_impl.train", *flags]
    joined = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    return {
        "flax2": [[*flax, "--workdir", str(work / "flax2"), *joined, "--process-id", str(rank)]
                  for rank in (1, 0)],
        "flax1": [[*flax, "--workdir", str(work / "flax1")]],
        "torch2": [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(port + 1), "-m", "torch_ref.train", *flags,
                    "--device", "cpu", "--workdir", str(work / "torch2")]],
        "torch1": [[sys.executable, "-m", "torch_ref.train", *flags, "--device", "cpu",
                    "--workdir", str(work / "torch1")]],
    }


def run_together(argvs: list[list[str]]) -> tuple[int, str]:
    """Start `argvs` at once; (the worst exit status, the last one's stdout)."""
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for argv in argvs]
    outputs = [process.communicate()[0] for process in processes]
    return max(process.returncode for process in processes), outputs[-1]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.processes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the logs go")
    parser.add_argument("--extra", default="", help="flags added to every run (smoke tests)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = [machine_line("2 processes against 1").rstrip()]
    failed = []
    with tempfile.TemporaryDirectory() as work:
        for run, argvs in commands(Path(work), random.randint(20000, 40000),
                                   args.extra.split()).items():
            code, output = run_together(argvs)
            log += [f"## {run}", output.rstrip()]
            print("\n".join(log[-2:]), flush=True)
            if code:
                failed.append(f"{run} (exit {code})")
                continue
            shutil.copy(Path(work) / run / "metrics.jsonl", args.out / f"{run}.metrics.jsonl")
    (args.out / "two_processes.log").write_text("\n".join(log) + "\n")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
