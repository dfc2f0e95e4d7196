"""Flax vs torch speed, side by side in one process: `python -m compare.speed [--json FILE]`.

For `Net` at the recipe's batch size, augmentation and dropout on (the default recipe), each
framework's own product code: the training step (median and spread over many steps after
warm-up), training and eval images/s, compile/warm-up time and, unless `--no-epoch`, a full epoch.
The training steps are timed in alternating rounds (one Flax scan call, then as many torch steps),
so that both see the same machine, and the speed-up is also given as the median of the rounds'
ratios.
Also the training FLOPs per image (convolutions and head, counted from the layer shapes) and
the achieved GFLOP/s. A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compare.layers import conv_shapes
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


def train_flops_per_image() -> float:
    """FLOPs of `Net`'s convolutions and head per training image, forward and backward.

    The backward pass: kernel and input gradients (no input gradient for the first layer, whose
    input is the data); 2 FLOPs per multiply-add. Counted from the layer shapes, not by XLA:
    its cost analysis counts a loop body once, and the kernel gradients run in a loop over the
    taps.
    """
    flops = 0.0
    for index, (_, (_, channels, height, width), out_channels) in enumerate(conv_shapes(1)):
        multiply_adds = (height - 2) * (width - 2) * out_channels * 9 * channels
        flops += 2 * multiply_adds * (2 if index == 0 else 3)
    head = create_torch_model("net", 0.0).head
    return flops + 2 * head.in_features * head.out_features * 3


def spread(times: list[float]) -> dict:
    """Median, quartiles and count of a list of seconds, in milliseconds."""
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "n": len(times)}


class FlaxBench:
    """The Flax product path, ready to time: jitted scans of `steps_per_call` train steps."""

    def __init__(self, data, config: Config, steps_per_call: int):
        self.steps_per_call = steps_per_call
        self.steps = config.steps_per_epoch(len(data.train_images))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        model, tx, state, key = flax_train.build(config, self.steps)
        self.state = jax.device_put(state, replicated)
        self.arrays = jax.device_put((data.train_images, data.train_labels), replicated)
        self.test = jax.device_put((data.test_images, data.test_labels), replicated)
        self.step_fn = flax_train.make_train_step(model, tx, config)
        self.train_chunk = flax_train.make_train_chunk(self.step_fn, batch_sharding)
        self.evaluate_fn = flax_train.make_evaluate(model, config.eval_batch_size, batch_sharding)
        self.indices, self.keys = flax_train.epoch_plan(key, 1, len(data.train_images),
                                                        self.steps, config.batch_size)
        start = time.perf_counter()
        self._run(0, steps_per_call)
        self.evaluate()
        self.warmup_seconds = time.perf_counter() - start

    def _run(self, first: int, stop: int):
        self.state, metrics = self.train_chunk(self.state, *self.arrays,
                                               self.indices[first:stop], self.keys[first:stop])
        return metrics

    def train(self, chunk: int, calls: int = 1) -> float:
        """Seconds per step of `calls` scan calls from the `chunk`-th of the epoch, cyclically."""
        start = time.perf_counter()
        for call in range(chunk, chunk + calls):
            first = (call * self.steps_per_call) % (self.steps - self.steps_per_call)
            metrics = self._run(first, first + self.steps_per_call)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / (calls * self.steps_per_call)

    def evaluate(self) -> float:
        """Seconds to evaluate the 10k test images."""
        start = time.perf_counter()
        jax.block_until_ready(self.evaluate_fn(flax_train.variables_of(self.state), *self.test))
        return time.perf_counter() - start

    def epoch(self) -> float:
        """Seconds for one epoch of training, as `flax_impl.train` runs it."""
        start = time.perf_counter()
        for first, stop in flax_train.chunks(self.steps, self.steps_per_call):
            metrics = self._run(first, stop)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start


class TorchBench:
    """The torch product path, ready to time: its train_step on in-memory tensors."""

    def __init__(self, data, config: Config):
        torch.manual_seed(0)
        self.config = config
        self.images = torch.from_numpy(data.train_images)
        self.labels = torch.from_numpy(data.train_labels).long()
        self.test = (torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels).long())
        self.steps = config.steps_per_epoch(len(self.images))
        self.model = create_torch_model("net", config.dropout).train()
        self.optimizer, self.scheduler = torch_train.create_optimizer(
            self.model, config, config.epochs * self.steps)
        self.generator = torch.Generator().manual_seed(0)
        self.order = torch.randperm(len(self.images), generator=self.generator)
        self.done = 0
        start = time.perf_counter()
        self.train(3)
        self.warmup_seconds = time.perf_counter() - start

    def _step(self):
        batch = self.config.batch_size
        first = (self.done % self.steps) * batch
        index = self.order[first:first + batch]
        self.done += 1
        return torch_train.train_step(self.model, self.optimizer, self.scheduler,
                                      self.images[index], self.labels[index], self.config,
                                      self.generator)

    def train(self, steps: int) -> list[float]:
        """Seconds of each of `steps` train steps."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self._step()
            times.append(time.perf_counter() - start)
        return times

    def evaluate(self) -> float:
        """Seconds to evaluate the 10k test images."""
        start = time.perf_counter()
        torch_train.evaluate(self.model, *self.test, self.config.eval_batch_size)
        self.model.train()
        return time.perf_counter() - start

    def epoch(self) -> float:
        """Seconds for one epoch of training."""
        start = time.perf_counter()
        for _ in range(self.steps):
            loss = self._step()
        loss.item()
        return time.perf_counter() - start


def side_by_side(flax: FlaxBench, torch_bench: TorchBench, rounds: int, epoch: bool) -> dict:
    """Alternate the frameworks: each round one Flax scan call, then as many torch steps.

    The machine's speed drifts (a shared host); the ratio of each round's two timings cancels
    the drift, and the median of those ratios is the speed-up reported.
    """
    flax_steps, torch_steps, ratios = [], [], []
    for i in range(rounds):
        flax_steps.append(flax.train(i + 1))
        times = torch_bench.train(flax.steps_per_call)
        torch_steps += times
        ratios.append(statistics.median(times) / flax_steps[-1])
    flax_evals, torch_evals = [], []
    for _ in range(3):
        flax_evals.append(flax.evaluate())
        torch_evals.append(torch_bench.evaluate())
    results = {
        "flax": {"step": spread(flax_steps), "eval_seconds": statistics.median(flax_evals),
                 "warmup_seconds": flax.warmup_seconds},
        "torch": {"step": spread(torch_steps), "eval_seconds": statistics.median(torch_evals),
                  "warmup_seconds": torch_bench.warmup_seconds,
                  "threads": torch.get_num_threads()},
        "paired_step_speedup": statistics.median(ratios),
        "train_flops_per_image": train_flops_per_image(),
    }
    if epoch:
        results["flax"]["epoch_seconds"] = flax.epoch()
        results["torch"]["epoch_seconds"] = torch_bench.epoch()
    return results


def undone_speedups() -> dict[str, tuple[object, str, object]]:
    """Each speed-up of the Flax step as the patch that undoes it: (module, attribute, value).

    first_layer_as_others: XLA's convolution forward and a product per tap for the first layer's
    kernel gradient; gather_rotation: the rotation by gathering (`map_coordinates`) instead of
    shifted copies; stock_pool: `nn.max_pool` (a reduce-window and select-and-scatter) in place
    of flax_impl.pool; stock_conv: XLA's own convolution gradients (`lax.conv_general_dilated`
    in place of flax_impl.conv).
    """
    import flax.linen as nn
    from jax import lax

    import flax_impl.augment as flax_augment
    import flax_impl.conv as flax_conv
    import flax_impl.model as flax_model

    return {
        "first_layer_as_others": (flax_conv, "FEW_CHANNELS", 0),
        "gather_rotation": (flax_augment, "MAX_SHIFT_RADIUS", 0),
        "stock_pool": (flax_model, "max_pool", nn.max_pool),
        "stock_conv": (flax_model, "conv_general_dilated", lax.conv_general_dilated),
    }


@contextlib.contextmanager
def patched(module, name: str, value):
    """Temporarily set `module.name = value`."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def ablation(data, config: Config, rounds: int, steps_per_call: int) -> dict:
    """Flax step medians with each speed-up undone, timed in turns with the default path.

    Variants: a Python loop of jitted single steps, and each of `undone_speedups()`. For each:
    the median ms per step and the slow-down against the default (the median of the per-round
    ratios).
    """

    def build(patch):
        with patched(*patch):  # FlaxBench compiles its step, which fixes the patch in it
            return FlaxBench(data, config, steps_per_call)

    benches = {  # name: (bench, scan calls per round)
        "default": (FlaxBench(data, config, steps_per_call), 1),
        "python_loop": (FlaxBench(data, config, 1), steps_per_call),
        **{name: (build(patch), 1) for name, patch in undone_speedups().items()},
    }
    times = {name: [] for name in benches}
    for i in range(rounds):
        for name, (bench, calls) in benches.items():
            times[name].append(bench.train(i + 1, calls))
    return {name: {"median_ms": 1e3 * statistics.median(ts),
                   "slowdown": statistics.median(
                       t / d for t, d in zip(ts, times["default"], strict=True))}
            for name, ts in times.items()}


def machine() -> dict:
    """Where the numbers come from."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "peak_gflops": peak_gflops()}


ABLATIONS = {
    "default": "default (flax_impl conv, pool, rotation; lax.scan)",
    "first_layer_as_others": "first layer like the others (no im2col, XLA forward)",
    "gather_rotation": "rotation by gathering (map_coordinates)",
    "stock_pool": "XLA's own max-pool gradient (nn.max_pool)",
    "python_loop": "Python loop of jitted single steps",
    "stock_conv": "XLA's own convolution gradients (stock nn.Conv)",
}


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
    rows.append(("train step, paired rounds", "", "", f"{results['paired_step_speedup']:.2f}x"))
    add("training images/s", 1e3 * batch / f["step"]["median_ms"],
        1e3 * batch / t["step"]["median_ms"], "img/s", True)
    add("eval images/s (10k test set)", 10_000 / f["eval_seconds"], 10_000 / t["eval_seconds"],
        "img/s", True)
    add("compile / warm-up", f["warmup_seconds"], t["warmup_seconds"], "s", False)
    if "epoch_seconds" in f:
        add("full epoch (468 steps)", f["epoch_seconds"], t["epoch_seconds"], "s", False)
    flops = results["train_flops_per_image"]
    achieved = flops * 1e3 / f["step"]["median_ms"] * batch / 1e9
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, [30, 20, 20, 16], strict=True)).rstrip()
             for r in rows]
    lines += ["", "flax/torch speed > 1: flax is faster. Paired rounds: each round times one flax "
                  "scan call, then as many\ntorch steps; their ratio's median over the rounds "
                  "(drift in the machine's speed cancels out)."]
    if "ablation" in results:
        lines += ["", "flax with each speed-up undone, timed in turns with the default "
                      "(median ms per train step, slow-down against the default):"]
        for name, label in ABLATIONS.items():
            a = results["ablation"][name]
            lines.append(f"  {label:<58} {a['median_ms']:7.1f} ms  {a['slowdown']:5.2f}x")
    m = results["machine"]
    peak = results["machine"].get("peak_gflops")
    of_peak = f" = {100 * achieved / peak:.0f} % of a {peak:.0f} GFLOP/s peak" if peak else ""
    lines += ["", f"training FLOPs per image (convolutions and head, forward and gradients): "
                  f"{flops / 1e6:.2f} M; achieved: flax {achieved:.1f} GFLOP/s{of_peak}",
              f"machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} ({m['jax_backend']}, "
              f"{len(m['jax_devices'])} device(s)), torch {m['torch']} "
              f"({results['torch']['threads']} threads), python {m['python']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=390, help="train steps timed per framework")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="Flax steps per jitted scan (default: the product's)")
    parser.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    parser.add_argument("--ablation", action="store_true",
                        help="also time Flax with each speed-up undone (slow: three more compiles)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--data-source", default="auto")
    args = parser.parse_args(argv)
    config = Config(data_source=args.data_source)
    data = load_mnist(args.data_source)
    steps_per_call = args.steps_per_call or flax_train.default_steps_per_call()
    results = {"batch_size": config.batch_size, "steps_per_call": steps_per_call,
               "machine": machine()}
    rounds = max(1, args.steps // steps_per_call)
    results.update(side_by_side(FlaxBench(data, config, steps_per_call), TorchBench(data, config),
                                rounds, not args.no_epoch))
    if args.ablation:
        results["ablation"] = ablation(data, config, max(1, rounds // 2), steps_per_call)
    print(report(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
