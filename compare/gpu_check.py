"""The accelerator check: `python -m compare.gpu_check --out DIR` on a GPU (or TPU) machine.

One prepared command for a lent accelerator, where jax, flax, optax, orbax and torch are
installed and nothing can be downloaded (no tfds, no network). In order, each step in its own
process with its own time limit, so that one failure or overrun leaves the others' results:

1. the devices JAX and torch see;
2. the parity checks (`compare.parity`), torch on CUDA and JAX on its accelerator, TF32 off;
3. speed (`compare.speed --ablation`): Flax against torch, and stock Flax against the fast
   kernels and a `lax.scan` of 39 steps against a loop of single steps;
4. the default recipe, 20 epochs, in Flax and in torch;
5. the fast recipe (`--recipe fast`, 3 epochs), in Flax and in torch.

Writes 8 files into DIR (what the device tool brings back): summary.json (devices, each step's
exit status and seconds, each training's recipe, model and per-epoch metrics), parity.txt,
speed.txt, speed.json, and the logs flax_train.log, torch_train.log, flax_fast.log,
torch_fast.log. MNIST comes from the cache; `--mnist-gz FILE` unpacks a gzipped cache (made here
with `--pack FILE`, 11 MB instead of 55) into a temporary cache first.
`--quick` is a smoke run of the same steps on any machine (tested on the CPU).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flax_impl.common.data import CACHE_FILE, cache_dir
from flax_impl.common.errors import WorkdirError
from flax_impl.common.workdir import read_metrics, workdir_record

# (name, command after `python -m`, seconds allowed, its training workdir or None); the
# limits add up to 580 s, inside one 600-second device command (results/gpu/ has what each
# took).
FULL_STEPS = [
    ("parity", ["compare.parity", "--device", "auto"], 120, None),
    ("speed", ["compare.speed", "--no-epoch", "--steps", "312",
               "--steps-per-call", "39", "--json", "{out}/speed.json"], 150, None),
    ("flax_train", ["flax_impl.train", "--workdir", "{work}/flax"], 90, "{work}/flax"),
    ("torch_train", ["torch_ref.train", "--device", "auto", "--workdir", "{work}/torch"], 120,
     "{work}/torch"),
    ("flax_fast", ["flax_impl.train", "--recipe", "fast", "--workdir", "{work}/flax_fast"], 50,
     "{work}/flax_fast"),
    ("torch_fast", ["torch_ref.train", "--recipe", "fast", "--device", "auto",
                    "--workdir", "{work}/torch_fast"], 50, "{work}/torch_fast"),
]
SMALL_TRAINING = ["--epochs", "1", "--train-examples", "512"]
QUICK_FLAGS = {  # the same steps, small: a smoke run
    "parity": ["--checks", "4,5"],
    "speed": ["--steps", "2", "--steps-per-call", "1"],
    **{name: SMALL_TRAINING for name in ("flax_train", "torch_train", "flax_fast", "torch_fast")},
}
# Only in the full check: the ablation (seven more compiled steps; tested on its own).
FULL_FLAGS = {"speed": ["--ablation"]}
LOGS = {"parity": "parity.txt", "speed": "speed.txt", "flax_train": "flax_train.log",
        "torch_train": "torch_train.log", "flax_fast": "flax_fast.log",
        "torch_fast": "torch_fast.log"}


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
                            text=True, timeout=300)
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


def run_step(name: str, argv: list[str], limit: int, out: Path, env: dict) -> dict:
    """Run `python -m argv` with output to DIR's log; its exit status and seconds."""
    start = time.perf_counter()
    with open(out / LOGS[name], "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", *argv], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - start
    print(f"{name}: exit {code} in {seconds:.0f} s ({LOGS[name]})", flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "limit": limit}


def training_record(workdir: Path) -> dict:
    """What a training step left in its workdir: the config's recipe, model and epochs, and the
    per-epoch metrics (empty where the run wrote none)."""
    try:
        recorded = workdir_record(workdir)
    except WorkdirError:  # the step failed before writing one
        recorded = {}
    return {"config": {key: recorded.get(key) for key in ("recipe", "model", "epochs")},
            "metrics": read_metrics(workdir / "metrics.jsonl")}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="where the files go (default: "
                        "results/gpu/<card>)")
    parser.add_argument("--mnist-gz", type=Path, help="a gzipped MNIST cache to use")
    parser.add_argument("--pack", type=Path, metavar="FILE",
                        help="only write this machine's MNIST cache, gzipped, to FILE")
    parser.add_argument("--data-source", default="auto")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of each step")
    args = parser.parse_args(argv)
    if args.pack:
        pack_cache(args.pack)
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    found = devices(env)
    out = args.out or Path("results/gpu") / card_name(found)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.mnist_gz:
        unpack_cache(args.mnist_gz, work / "cache")
        env["MNIST20K_CACHE"] = str(work / "cache")
    print(json.dumps(found, indent=2), flush=True)
    summary = {"devices": found, "quick": args.quick, "steps": {}}
    for name, command, limit, workdir in FULL_STEPS:
        command = [part.format(out=out, work=work) for part in command]
        command += ["--data-source", args.data_source] + (QUICK_FLAGS[name] if args.quick
                                                          else FULL_FLAGS.get(name, []))
        summary["steps"][name] = run_step(name, command, limit, out, env)
        if workdir:
            summary["steps"][name].update(training_record(Path(workdir.format(work=work))))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, step in summary["steps"].items() if step["exit"] != 0]
    print(f"wrote {out}; " + (f"failed: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
