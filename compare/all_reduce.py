"""What one all-reduce costs between 2 processes on this machine: `python -m compare.all_reduce`.

A train step over 2 processes waits on a chain of small all-reduces (`compare.collectives`
counts them). This times such a chain alone, in both frameworks over gloo: 2 jax.distributed
processes and 2 torch ranks each run a program of `--count` all-reduces of `--floats` float32
values, once with nothing between them (idle) and once with `--products` matrix products
between each two (compute-bound, as in training), and the same programs without the
all-reduces. With `--arrays K` each all-reduce reduces K arrays of `--floats` values together,
as XLA's combined all-reduce of a step's gradients does (a tuple of arrays, which XLA:CPU
reduces one array at a time); torch reduces them with K calls. The cost of one all-reduce is
the difference divided by `--count`: under load it includes the wait for the other process
and for the cores that the compute and gloo's threads share. Prints one line per framework and
setting; `--json FILE` keeps them. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from compare.machine import machine_line
from compare.processes import run_together

ROWS, WIDTH = 512, 256  # each process's rows, and the width of the matrix products


def _median_seconds(run, calls: int) -> float:
    run()  # compiles or warms up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def jax_worker(rank: int, port: int, count: int, floats: int, products: int, calls: int,
               arrays: int = 1) -> dict:
    """In one of 2 jax processes: {setting: median seconds per call}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.distributed.initialize(f"127.0.0.1:{port}", 2, rank)
    split = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(WIDTH, WIDTH)) / 16,
                          jnp.float32)

    def chain(x, reduce: bool, steps: int):
        for _ in range(count):
            for _ in range(steps):
                x = jnp.tanh(x @ weights)
            # Over the rows: across processes when split; several sums, one tuple all-reduce.
            columns = [x[:, i * floats:(i + 1) * floats].sum(axis=0) for i in range(arrays)]
            x = x.at[:, :arrays * floats].add(1e-3 * jnp.concatenate(columns) if reduce else 0.0)
        return x

    rows = np.full((ROWS, WIDTH), 0.1, np.float32)
    shared = jax.make_array_from_callback((2 * ROWS, WIDTH), split, lambda index: rows)
    local = jax.device_put(rows, jax.local_devices()[0])
    found = {}
    for setting, steps in (("idle", 0), ("between products", products)):
        for name, x, reduce in (("with", shared, True), ("without", local, False)):
            program = jax.jit(lambda x, r=reduce, s=steps: chain(x, r, s))
            multihost_utils.sync_global_devices(f"{setting} {name}")
            found[f"{setting}, {name}"] = _median_seconds(
                lambda p=program, x=x: p(x).block_until_ready(), calls)
    return found


def torch_worker(count: int, floats: int, products: int, calls: int, arrays: int = 1) -> dict:
    """In one of 2 torch ranks (started by torch.distributed.run): {setting: seconds per call}."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    weights = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(0)) / 16

    def chain(reduce: bool, steps: int):
        x = torch.full((ROWS, WIDTH), 0.1)
        for _ in range(count):
            for _ in range(steps):
                x = torch.tanh(x @ weights)
            columns = [x[:, i * floats:(i + 1) * floats].sum(dim=0) for i in range(arrays)]
            if reduce:
                for column in columns:
                    dist.all_reduce(column)
            x[:, :arrays * floats] += 1e-3 * torch.cat(columns)

    found = {}
    with torch.no_grad():
        for setting, steps in (("idle", 0), ("between products", products)):
            for name, reduce in (("with", True), ("without", False)):
                dist.barrier()
                found[f"{setting}, {name}"] = _median_seconds(
                    lambda r=reduce, s=steps: chain(r, s), calls)
    dist.destroy_process_group()
    return found


def per_all_reduce(found: dict, count: int) -> dict:
    """{setting: (seconds per all-reduce, seconds per call without them)}."""
    return {setting: ((found[f"{setting}, with"] - found[f"{setting}, without"]) / count,
                      found[f"{setting}, without"])
            for setting in ("idle", "between products")}


def report(framework: str, found: dict, count: int, floats: int, arrays: int = 1) -> list[str]:
    """One line per setting."""
    size = f"{4 * floats} B" if arrays == 1 else f"{arrays} arrays of {4 * floats} B"
    return [f"{framework}: {count} all-reduces of {size}, {setting}: "
            f"{1e6 * each:,.0f} us each (the program without them: {1e3 * rest:.1f} ms)"
            for setting, (each, rest) in per_all_reduce(found, count).items()]


def _worker_output(argvs: list[list[str]]) -> dict:
    """Start the workers `argvs` together; the measurements the last of them printed."""
    code, output = run_together(argvs)
    if code:
        raise RuntimeError(f"a worker failed (exit {code}): {' '.join(argvs[-1])}")
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.all_reduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=13, help="all-reduces per call")
    parser.add_argument("--floats", type=int, default=32, help="float32 values each")
    parser.add_argument("--products", type=int, default=2,
                        help="matrix products between two all-reduces under load")
    parser.add_argument("--arrays", type=int, default=1,
                        help="arrays reduced together by each all-reduce (default: 1)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per setting")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (0 < args.floats and 0 < args.arrays and args.arrays * args.floats <= WIDTH
            and args.count > 0 and args.products >= 0 and args.calls > 0):
        parser.error(f"--arrays x --floats must be 1..{WIDTH}; --count, --calls > 0; "
                     "--products >= 0")
    shape = [str(v) for v in (args.count, args.floats, args.products, args.calls, args.arrays)]
    if args.worker:
        if args.worker == "jax":
            found = jax_worker(args.rank, args.port, *map(int, shape))
        else:
            found = torch_worker(*map(int, shape))
        if args.rank == 0 and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(found))
        return 0
    flags = ["--count", shape[0], "--floats", shape[1], "--products", shape[2],
             "--calls", shape[3], "--arrays", shape[4]]
    port = random.randint(20000, 40000)
    me = [sys.executable, "-m", "compare.all_reduce", *flags]
    found = {
        "jax": _worker_output([[*me, "--worker", "jax", "--rank", str(rank), "--port", str(port)]
                               for rank in (1, 0)]),  # rank 0, last, prints
        "torch": _worker_output([[sys.executable, "-m", "torch.distributed.run",
                                  "--nproc-per-node", "2", "--master-port", str(port + 1),
                                  "-m", "compare.all_reduce", *flags, "--worker", "torch"]]),
    }
    lines = [machine_line("all-reduce between 2 processes").rstrip()]
    for framework, measured in found.items():
        lines += report(framework, measured, args.count, args.floats, args.arrays)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"count": args.count, "floats": args.floats,
                                         "arrays": args.arrays,
                                         "products": args.products, **found}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
