"""The collectives of one Flax train step: `python -m compare.collectives` (see --help).

Compiles the jitted train chunk of one step over `--devices` CPU devices of one process (the
program each of that many `jax.distributed` processes runs with one device each: the same
sharded batch, the same collectives) and lists every cross-device collective XLA kept, in
program order, with its bytes and its arrays. XLA combines several all-reduces into one
over a tuple of arrays, and XLA:CPU runs such a tuple as one all-reduce per array, one after the
other (`AllReduceThunk` calls the communicator per buffer): over gloo each array is its own
round of messages, so the arrays are what a step waits on. Then a model of what they cost on a
network link: a ring all-reduce over P processes takes 2 (P - 1) latencies and moves
2 (P - 1) / P of its bytes through each process's link, so a step's communication is

    arrays x 2 (P - 1) x latency  +  total bytes x 2 (P - 1) / P / bandwidth.

A measurement of the program's structure, not of time: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(-start)?\(")
ARRAY = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")
BYTES = {"pred": 1, "bf16": 2}


def array_count(shapes: str) -> int:
    """How many arrays an HLO result type holds: 1 for 'f32[10]{0}', 2 for '(f32[10]{0}, f32[])'."""
    return len(ARRAY.findall(shapes))


def array_bytes(shapes: str) -> int:
    """Bytes of the arrays in an HLO result type, e.g. '(f32[10]{0}, f32[2,3]{1,0})'."""
    total = 0
    for dtype, dims in ARRAY.findall(shapes):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * (BYTES.get(dtype) or int(dtype[1:]) // 8)
    return total


COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
CALLED = re.compile(r"(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def collectives_of(hlo_text: str) -> list[dict]:
    """Every collective in a compiled HLO module's text, in program order: [{"op", "bytes",
    "arrays", "times"}], `arrays` the arrays it reduces together (a tuple's), `times` how often
    one run of the module executes it (inside a loop of 9 iterations: 9)."""
    parent: dict[str, tuple[str, int]] = {}  # computation -> (its caller, iterations per call)
    found, computation = [], None
    for line in hlo_text.splitlines():
        line = line.strip()
        header = COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            computation = header[1]
            continue
        trips = TRIPS.search(line)
        for kind, names in CALLED.findall(line):
            for name in names.strip("{}").replace("%", "").split(","):
                if name.strip():
                    count = int(trips[1]) if kind == "body" and trips else 1
                    parent[name.strip()] = (computation, count)
        match = COLLECTIVE.search(line)
        if match:
            found.append({"op": match[2], "bytes": array_bytes(match[1]),
                          "arrays": array_count(match[1]), "in": computation})
    for collective in found:
        times, where, seen = 1, collective.pop("in"), set()
        while where in parent and where not in seen:
            seen.add(where)
            where, count = parent[where]
            times *= count
        collective["times"] = times
    return found


def step_collectives(recipe: str, kernels: str) -> dict:
    """Compile one train step of `recipe` over all of this process's devices; its collectives."""
    import jax
    import numpy as np

    from flax_impl.common.config import recipe_config
    from flax_impl.common.data import Mnist
    from flax_impl.common.models import model_widths
    from flax_impl.setup import describe_kernels, setup_training

    config = recipe_config(recipe)
    images = np.zeros((2 * config.batch_size, 28, 28), np.uint8)
    labels = np.zeros(2 * config.batch_size, np.uint8)
    run = setup_training(config, Mnist(images, labels, images[:16], labels[:16]),
                         kernels=kernels, steps_per_call=1)
    indices, keys = run.plan(1)
    compiled = run.train_chunk.lower(run.state, *run.train_data, indices[:1], keys[:1],
                                     run.schedule).compile()
    params = sum(x.size for x in jax.tree.leaves(run.state.params))
    return {"recipe": recipe, "model": config.model,
            "widths": list(model_widths(config.model, config.widths)),
            "kernels": describe_kernels(kernels), "devices": jax.device_count(),
            "batch_size": config.batch_size, "trainable_parameters": int(params),
            "collectives": collectives_of(compiled.as_text())}


def link_model(collectives: list[dict], processes: int, latency_us: float,
               gbit_per_s: float) -> dict:
    """Seconds per step of `collectives` as ring all-reduces over `processes` on a link."""
    hops = 2 * (processes - 1)
    total = sum(c["bytes"] * c.get("times", 1) for c in collectives)
    messages = sum(c.get("arrays", 1) * c.get("times", 1) for c in collectives)
    latency = messages * hops * latency_us * 1e-6
    transfer = total * hops / processes / (gbit_per_s * 1e9 / 8)
    return {"latency_s": latency, "transfer_s": transfer, "step_s": latency + transfer}


def report(found: dict) -> str:
    """The printed table: each collective, the totals and `found["link_model"]`."""
    collectives, model = found["collectives"], found["link_model"]
    count = sum(c["times"] for c in collectives)
    arrays = sum(c["arrays"] * c["times"] for c in collectives)
    total = sum(c["bytes"] * c["times"] for c in collectives)
    lines = [f"{found['recipe']} recipe ({found['model']}, {found['trainable_parameters']:,} "
             f"parameters), {found['kernels']} kernels, batch {found['batch_size']} over "
             f"{found['devices']} devices: {count} collectives run per train step "
             f"({len(collectives)} in the program) over {arrays} arrays, {total:,} bytes; "
             f"XLA:CPU reduces each array on its own: {arrays} all-reduces over gloo"]
    lines += [f"  {i:2d}  {c['op']:<12} {c['bytes']:>8,} B"
              + (f" in {c['arrays']} arrays" if c["arrays"] > 1 else "")
              + (f"  x {c['times']} (in a loop)" if c["times"] > 1 else "")
              for i, c in enumerate(collectives, 1)]
    lines.append(f"on a {model['gbit_per_s']:g} Gbit/s link with {model['latency_us']:g} us per "
                 f"message, {model['processes']} processes (ring): "
                 f"{1e3 * model['latency_s']:.2f} ms of latency + "
                 f"{1e3 * model['transfer_s']:.3f} ms of transfer = "
                 f"{1e3 * model['step_s']:.2f} ms per step")
    return "\n".join(lines)


def child_env(devices: int) -> dict:
    """The environment of a process with `devices` CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.collectives", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default", help="the recipe's step (default: default)")
    parser.add_argument("--kernels", choices=("auto", "stock", "fast"), default="auto")
    parser.add_argument("--devices", type=int, default=2,
                        help="CPU devices the step is split over (default: 2)")
    parser.add_argument("--latency-us", type=float, default=50.0,
                        help="one message's latency in the link model (default: 50)")
    parser.add_argument("--gbit-per-s", type=float, default=10.0,
                        help="the link's bandwidth in the model (default: 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error(f"--devices must be >= 2 (one device has no collectives), got {args.devices}")
    if "jax" in sys.modules:  # the device count is fixed once jax has started: a new process
        command = [sys.executable, "-m", "compare.collectives", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=child_env(args.devices)).returncode
    os.environ.update(child_env(args.devices))
    found = step_collectives(args.recipe, args.kernels)
    found["link_model"] = {"processes": args.devices, "latency_us": args.latency_us,
                           "gbit_per_s": args.gbit_per_s,
                           **link_model(found["collectives"], args.devices, args.latency_us,
                                        args.gbit_per_s)}
    print(report(found))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
