"""Flax vs torch speed, side by side in one process: `python -m compare.speed [--json FILE]`.

For `Net` at the recipe's batch size, augmentation and dropout on (the default recipe), each
framework's own product code: the training step (median and spread over many steps after
warm-up), training and eval images/s, compile/warm-up time and, unless `--no-epoch`, a full epoch.
Also the training FLOPs per image (XLA's count of the compiled train step) and the achieved
GFLOP/s. A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_impl import train as flax_train
from flax_impl.config import Config
from flax_impl.data import load_mnist
from torch_ref import train as torch_train
from torch_ref.model import create_model as create_torch_model


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_gflops() -> float | None:
    """Rough float32 peak of this CPU: cores x clock x FLOPs per cycle (FMA: 2 per lane).

    AVX-512 with FMA: 2 x 16 lanes x 2; AVX2 with FMA: 2 units x 8 lanes x 2 (Zen 2+, Haswell+).
    """
    try:
        with open("/proc/cpuinfo") as file:
            text = file.read()
    except OSError:
        return None
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    mhz = next((float(line.split(":")[1]) for line in text.splitlines()
                if line.startswith("cpu MHz")), None)
    if mhz is None or "fma" not in flags:
        return None
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    return (os.cpu_count() or 1) * mhz * 1e6 * per_cycle / 1e9


def spread(times: list[float]) -> dict:
    """Median, quartiles and count of a list of seconds, in milliseconds."""
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "n": len(times)}


def bench_flax(data, config: Config, chunks: int, steps_per_call: int, epoch: bool) -> dict:
    """Time the Flax product path: jitted scans of `steps_per_call` train steps."""
    steps = config.steps_per_epoch(len(data.train_images))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model, tx, state, key = flax_train.build(config, steps)
    state = jax.device_put(state, replicated)
    images, labels, test_images, test_labels = jax.device_put(
        (data.train_images, data.train_labels, data.test_images, data.test_labels), replicated)
    step_fn = flax_train.make_train_step(model, tx, config)
    train_chunk = flax_train.make_train_chunk(step_fn, batch_sharding)
    evaluate = flax_train.make_evaluate(model, config.eval_batch_size, batch_sharding)
    indices, keys = flax_train.epoch_plan(key, 1, len(data.train_images), steps, config.batch_size)

    start = time.perf_counter()
    state, metrics = train_chunk(state, images, labels, indices[:steps_per_call],
                                 keys[:steps_per_call])
    jax.block_until_ready(metrics)
    jax.block_until_ready(evaluate(flax_train.variables_of(state), test_images, test_labels))
    warmup = time.perf_counter() - start

    per_step = []
    for i in range(chunks):
        first = (i * steps_per_call) % (steps - steps_per_call)
        start = time.perf_counter()
        state, metrics = train_chunk(state, images, labels, indices[first:first + steps_per_call],
                                     keys[first:first + steps_per_call])
        jax.block_until_ready(metrics)
        per_step.append((time.perf_counter() - start) / steps_per_call)
    evals = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(flax_train.variables_of(state), test_images, test_labels))
        evals.append(time.perf_counter() - start)

    batch = (jnp.asarray(data.train_images[:config.batch_size]),
             jnp.asarray(data.train_labels[:config.batch_size]))
    cost = jax.jit(step_fn).lower(state, batch, keys[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result = {"step": spread(per_step), "eval_seconds": statistics.median(evals),
              "warmup_seconds": warmup,
              "train_flops_per_image": float(cost.get("flops", float("nan"))) / config.batch_size}
    if epoch:
        start = time.perf_counter()
        for first, stop in flax_train.chunks(steps, steps_per_call):
            state, metrics = train_chunk(state, images, labels, indices[first:stop],
                                         keys[first:stop])
        jax.block_until_ready(metrics)
        result["epoch_seconds"] = time.perf_counter() - start
    return result


def bench_torch(data, config: Config, steps_timed: int, epoch: bool) -> dict:
    """Time the torch product path: its train_step on in-memory tensors."""
    torch.manual_seed(0)
    images = torch.from_numpy(data.train_images)
    labels = torch.from_numpy(data.train_labels).long()
    steps = config.steps_per_epoch(len(images))
    model = create_torch_model("net", config.dropout).train()
    optimizer, scheduler = torch_train.create_optimizer(model, config, config.epochs * steps)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)

    def step(i):
        index = order[(i % steps) * config.batch_size:(i % steps + 1) * config.batch_size]
        return torch_train.train_step(model, optimizer, scheduler, images[index], labels[index],
                                      config, generator)

    start = time.perf_counter()
    for i in range(3):
        step(i)
    warmup = time.perf_counter() - start
    per_step = []
    for i in range(steps_timed):
        start = time.perf_counter()
        step(i)
        per_step.append(time.perf_counter() - start)
    test_images, test_labels = torch.from_numpy(data.test_images), torch.from_numpy(
        data.test_labels).long()
    evals = []
    for _ in range(3):
        start = time.perf_counter()
        torch_train.evaluate(model, test_images, test_labels, config.eval_batch_size)
        evals.append(time.perf_counter() - start)
    model.train()
    result = {"step": spread(per_step), "eval_seconds": statistics.median(evals),
              "warmup_seconds": warmup, "threads": torch.get_num_threads()}
    if epoch:
        start = time.perf_counter()
        for i in range(steps):
            loss = step(i)
        loss.item()
        result["epoch_seconds"] = time.perf_counter() - start
    return result


def ablation(data, config: Config, steps: int, steps_per_call: int) -> dict:
    """Flax step medians without each speed-up: a Python loop of jitted single steps, and
    XLA's own convolution gradients (`lax.conv_general_dilated`) instead of flax_impl.conv."""
    from jax import lax

    import flax_impl.model as flax_model

    results = {"python_loop": bench_flax(data, config, steps, 1, False)["step"]["median_ms"]}
    fast = flax_model.conv_general_dilated
    flax_model.conv_general_dilated = lax.conv_general_dilated
    try:
        results["stock_conv"] = bench_flax(data, config, max(1, steps // steps_per_call),
                                           steps_per_call, False)["step"]["median_ms"]
    finally:
        flax_model.conv_general_dilated = fast
    return results


def machine() -> dict:
    """Where the numbers come from."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "peak_gflops": peak_gflops()}


def report(results: dict) -> str:
    """The comparison as a table with JAX/torch ratios (above 1: JAX is faster)."""
    f, t, batch = results["flax"], results["torch"], results["batch_size"]
    rows = [("metric", "flax", "torch", "flax/torch speed")]

    def add(name, flax_value, torch_value, unit, higher_is_better):
        ratio = flax_value / torch_value if higher_is_better else torch_value / flax_value
        rows.append((name, f"{flax_value:,.1f} {unit}", f"{torch_value:,.1f} {unit}",
                     f"{ratio:.2f}x"))

    add("train step, median", f["step"]["median_ms"], t["step"]["median_ms"], "ms", False)
    rows.append(("train step, quartiles", f"{f['step']['q1_ms']:.1f}-{f['step']['q3_ms']:.1f} ms",
                 f"{t['step']['q1_ms']:.1f}-{t['step']['q3_ms']:.1f} ms", ""))
    add("training images/s", 1e3 * batch / f["step"]["median_ms"],
        1e3 * batch / t["step"]["median_ms"], "img/s", True)
    add("eval images/s (10k test set)", 10_000 / f["eval_seconds"], 10_000 / t["eval_seconds"],
        "img/s", True)
    add("compile / warm-up", f["warmup_seconds"], t["warmup_seconds"], "s", False)
    if "epoch_seconds" in f:
        add("full epoch (468 steps)", f["epoch_seconds"], t["epoch_seconds"], "s", False)
    flops = f["train_flops_per_image"]
    achieved = flops * 1e3 / f["step"]["median_ms"] * batch / 1e9
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, [30, 20, 20, 16], strict=True)).rstrip()
             for r in rows]
    if "ablation" in results:
        a = results["ablation"]
        lines += ["", f"flax without its speed-ups (train step median): Python loop of jitted "
                      f"steps {a['python_loop']:.1f} ms; XLA's conv gradients in the scan "
                      f"{a['stock_conv']:.1f} ms; both on: {f['step']['median_ms']:.1f} ms"]
    m = results["machine"]
    peak = results["machine"].get("peak_gflops")
    of_peak = f" = {100 * achieved / peak:.0f} % of a {peak:.0f} GFLOP/s peak" if peak else ""
    lines += ["", f"training FLOPs per image (XLA count of the train step): {flops / 1e6:.1f} M; "
                  f"achieved: flax {achieved:.1f} GFLOP/s{of_peak}",
              f"machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} ({m['jax_backend']}, "
              f"{len(m['jax_devices'])} device(s)), torch {m['torch']} "
              f"({results['torch']['threads']} threads), python {m['python']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=156, help="train steps timed per framework")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="Flax steps per jitted scan (default: the product's)")
    parser.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    parser.add_argument("--ablation", action="store_true",
                        help="also time Flax without each speed-up (slow: two more compiles)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--data-source", default="auto")
    args = parser.parse_args(argv)
    config = Config(data_source=args.data_source)
    data = load_mnist(args.data_source)
    steps_per_call = args.steps_per_call or flax_train.default_steps_per_call()
    results = {"batch_size": config.batch_size, "steps_per_call": steps_per_call,
               "machine": machine()}
    results["torch"] = bench_torch(data, config, args.steps, not args.no_epoch)
    results["flax"] = bench_flax(data, config, max(1, args.steps // steps_per_call),
                                 steps_per_call, not args.no_epoch)
    if args.ablation:
        results["ablation"] = ablation(data, config, args.steps // 2, steps_per_call)
    print(report(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
