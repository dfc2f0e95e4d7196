"""Flax vs torch speed, side by side in one process: `python -m compare.speed [--json FILE]`.

JAX's persistent compilation cache is on, as for the training commands (`flax_impl.extras.compile_cache`;
`MNIST20K_JAX_CACHE=off` for cold compile times).

For `Net` at the recipe's batch size, augmentation and dropout on (the default recipe), each
framework's own product code: the training step (median and spread over many steps after
warm-up), training and eval images/s, compile/warm-up time and, unless `--no-epoch`, a full epoch.
The training steps are timed in alternating rounds (one Flax scan call, then as many torch steps),
so that both see the same machine, and the speed-up is also given as the median of the rounds'
ratios.
Also the training FLOPs per image (convolutions and head, counted from the layer shapes) and
the achieved GFLOP/s. `--ablation` also times Flax with each CPU kernel of `flax_impl.extras.fast`
undone (`dataclasses.replace` of the `FAST` kernels) and stock Flax; `--nnx` the NNX port
(`--api nnx`) against linen. A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compare.host import cpu_name, peak_gflops, vector_extensions
from flax_impl import augment as flax_augment
from flax_impl import core as flax_core
from flax_impl import train as flax_train
from flax_impl.common.atomic import write_output
from flax_impl.common.config import RECIPES, STEPS_PER_CALL, Config, OneLineParser, recipe_config
from flax_impl.common.data import load_mnist
from flax_impl.common.errors import ConfigError, DataError, first_line
from flax_impl.extras import fast as flax_fast
from flax_impl.extras.compile_cache import use_compilation_cache
from flax_impl.extras.distributed import check_backend
from flax_impl.extras.kernels import FAST, STOCK, Kernels, get_kernels
from torch_ref import core as torch_core
from torch_ref import train as torch_train
from torch_ref.model import create_model as create_torch_model


def conv_shapes(batch: int, model_name: str = "net"
                ) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """(name, NCHW input shape, output channels) of every convolution of model `model_name`, in
    order."""
    model = create_torch_model(model_name, 0.0).eval()
    shapes = []
    hooks = [module.register_forward_hook(
        lambda module, inputs, output, name=name: shapes.append(
            (name, tuple(inputs[0].shape), module.out_channels)))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(batch, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return shapes


def train_flops_per_image(model: str = "net") -> float:
    """FLOPs of `model`'s convolutions and head per training image, forward and backward.

    The backward pass: kernel and input gradients (no input gradient for the first layer, whose
    input is the data); 2 FLOPs per multiply-add. Counted from the layer shapes, not by XLA:
    its cost analysis counts a loop body once, and the kernel gradients run in a loop over the
    taps.
    """
    flops = 0.0
    for index, (_, (_, channels, height, width), out_channels) in enumerate(
            conv_shapes(1, model)):
        multiply_adds = (height - 2) * (width - 2) * out_channels * 9 * channels
        flops += 2 * multiply_adds * (2 if index == 0 else 3)
    head = create_torch_model(model, 0.0).head
    return flops + 2 * head.in_features * head.out_features * 3


def spread(times: list[float]) -> dict:
    """Median, quartiles and count of a list of seconds, in milliseconds."""
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3, "n": len(times)}


class FlaxBench:
    """The Flax training run as `flax_impl.train.train` builds it, ready to time: `create_port`,
    the jitted chunk (`core.make_train_chunk`), the evaluation and the epoch plan, on a 1-D mesh
    of `devices` (default: all)."""

    def __init__(self, data, config: Config, steps_per_call: int,
                 kernels: str | Kernels = "auto", devices: list | None = None):
        self.config, self.steps_per_call = config, steps_per_call
        count = config.training_images(len(data.train_images))
        self.steps = config.steps_per_epoch(count)
        mesh = Mesh(np.array(devices or jax.devices()), ("data",))
        replicated, batches = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        port = flax_train.create_port(config, config.epochs * self.steps, get_kernels(kernels))
        init_key, train_key = jax.random.split(jax.random.key(config.seed))
        self.train_data = jax.device_put((data.train_images[:count], data.train_labels[:count]),
                                         replicated)
        self.eval_data = jax.device_put(config.evaluation_set(data), replicated)
        self.train_chunk = flax_core.make_train_chunk(port.train_step, batches)
        self._evaluate = flax_core.make_evaluate(port.log_probs, config.eval_batch_size, batches)
        plan = jax.jit(functools.partial(flax_core.epoch_plan, train_key, num_train=count,
                                         steps=self.steps, batch_size=config.batch_size),
                       out_shardings=(NamedSharding(mesh, P(None, "data")), replicated))
        start = time.perf_counter()  # from here on: compiling and a first run of each program
        self.state = jax.jit(port.init, out_shardings=replicated)(init_key)
        self.indices, self.keys = plan(1)
        self._run(0, steps_per_call)
        self.evaluate()
        self.warmup_seconds = time.perf_counter() - start

    def _run(self, first: int, stop: int):
        self.state, metrics = self.train_chunk(self.state, *self.train_data,
                                               self.indices[first:stop], self.keys[first:stop])
        return metrics

    def train(self, chunk: int, calls: int = 1) -> float:
        """Seconds per step of `calls` scan calls from the `chunk`-th of the epoch, cyclically."""
        start = time.perf_counter()
        for call in range(chunk, chunk + calls):
            first = (call * self.steps_per_call) % max(1, self.steps - self.steps_per_call)
            metrics = self._run(first, first + self.steps_per_call)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / (calls * self.steps_per_call)

    def evaluate(self) -> float:
        """Seconds to evaluate the test images."""
        start = time.perf_counter()
        jax.block_until_ready(self._evaluate(self.state, *self.eval_data))
        return time.perf_counter() - start

    def epoch(self) -> float:
        """Seconds for one epoch of training, as `flax_impl.train.train_loop` runs it (a host
        sync of the chunk's loss after each call)."""
        start = time.perf_counter()
        for first in range(0, self.steps, self.steps_per_call):
            metrics = self._run(first, min(first + self.steps_per_call, self.steps))
            float(metrics["loss"].sum())
        return time.perf_counter() - start


class TorchBench:
    """The torch training run as `torch_ref.train.train` builds it (`create_run`), its steps
    `core.train_step` over the batches of `core.epoch_plan`, ready to time."""

    def __init__(self, data, config: Config, device: str = "auto"):
        self.config = config
        self.run = torch_train.create_run(config, data, device)
        self.steps = self.run.steps_per_epoch
        self.batches = torch_core.epoch_plan(self.run.generator, len(self.run.train_data[1]),
                                             self.steps, config.batch_size).to(self.run.device)
        self.done = 0
        start = time.perf_counter()
        self.train(3)
        self.warmup_seconds = time.perf_counter() - start

    def _step(self) -> torch.Tensor:
        batch = self.batches[self.done % self.steps]
        self.done += 1
        images, labels = self.run.train_data
        return torch_core.train_step(self.run.train_model, self.run.optimizer, self.run.scheduler,
                                     images[batch], labels[batch], self.config,
                                     self.run.generator)

    def _sync(self):
        if self.run.device.type == "cuda":  # CUDA runs asynchronously: wait for the step
            torch.cuda.synchronize(self.run.device)

    def train(self, steps: int) -> list[float]:
        """Seconds of each of `steps` train steps."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self._step()
            self._sync()
            times.append(time.perf_counter() - start)
        return times

    def evaluate(self) -> float:
        """Seconds to evaluate the test images."""
        start = time.perf_counter()
        torch_train.score(self.run, self.config.eval_batch_size)
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
        "model": flax.config.model,
        "steps_per_epoch": flax.steps,
        "train_flops_per_image": train_flops_per_image(flax.config.model),
    }
    if epoch:
        results["flax"]["epoch_seconds"] = flax.epoch()
        results["torch"]["epoch_seconds"] = torch_bench.epoch()
    return results


def ablation_variants() -> dict[str, Kernels]:
    """The fast kernels with each one undone in turn, and all of them (stock Flax).

    first_layer_as_others: XLA's convolution forward and a product per tap for the first layer's
    kernel gradient (no im2col); gather_rotation: `augment.rotate` (a gather) instead of shifted
    copies; stock_pool: `nn.max_pool` (a reduce-window and select-and-scatter); stock_conv:
    `jax.lax.conv_general_dilated` (XLA's own convolution gradients); stock: all four.
    """
    return {
        "first_layer_as_others": dataclasses.replace(
            FAST, name="fast, no im2col", conv_general_dilated=functools.partial(
                flax_fast.conv_general_dilated, im2col_channels=0)),
        "gather_rotation": dataclasses.replace(FAST, name="fast, gather rotation",
                                               rotate=flax_augment.rotate),
        "stock_pool": dataclasses.replace(FAST, name="fast, stock pool", max_pool=nn.max_pool),
        "stock_conv": dataclasses.replace(FAST, name="fast, stock conv",
                                          conv_general_dilated=jax.lax.conv_general_dilated),
        "stock": STOCK,
    }


def ablation(data, config: Config, rounds: int, steps_per_call: int) -> dict:
    """Flax step medians of each variant, timed in turns with the fast kernels.

    Variants: a Python loop of jitted single steps, and each of `ablation_variants()`. For each:
    the median ms per step and the slow-down against the fast kernels (the median of the
    per-round ratios).
    """
    benches = {  # name: (bench, scan calls per round)
        "default": (FlaxBench(data, config, steps_per_call, FAST), 1),
        "python_loop": (FlaxBench(data, config, 1, FAST), steps_per_call),
        **{name: (FlaxBench(data, config, steps_per_call, kernels), 1)
           for name, kernels in ablation_variants().items()},
    }
    times = {name: [] for name in benches}
    for i in range(rounds):
        for name, (bench, calls) in benches.items():
            times[name].append(bench.train(i + 1, calls))
    return {name: {"median_ms": 1e3 * statistics.median(ts),
                   "slowdown": statistics.median(
                       t / d for t, d in zip(ts, times["default"], strict=True))}
            for name, ts in times.items()}


def nnx_comparison(data, config: Config, rounds: int, steps_per_call: int) -> dict:
    """The NNX port (`--api nnx`: `nnx.Optimizer` and the NNX step, its state split through
    `jax.jit` and `lax.scan`) against linen's, timed in turns: the product's scan of
    `steps_per_call` steps, and single steps (a Python loop of jitted steps). Median ms per step,
    compile time, and each one's slow-down against linen's at the same steps per call (the median
    of the rounds' ratios)."""
    nnx_config = dataclasses.replace(config, api="nnx")
    benches = {  # name: (bench, calls per round, its linen baseline)
        "linen_scan": (FlaxBench(data, config, steps_per_call), 1, "linen_scan"),
        "nnx_scan": (FlaxBench(data, nnx_config, steps_per_call), 1, "linen_scan"),
        "linen_step": (FlaxBench(data, config, 1), steps_per_call, "linen_step"),
        "nnx_step": (FlaxBench(data, nnx_config, 1), steps_per_call, "linen_step"),
    }
    times = {name: [] for name in benches}
    for i in range(rounds):
        for name, (bench, calls, _) in benches.items():
            times[name].append(bench.train(i + 1, calls))
    return {name: {"median_ms": 1e3 * statistics.median(times[name]),
                   "warmup_seconds": bench.warmup_seconds,
                   "slowdown": statistics.median(
                       t / b for t, b in zip(times[name], times[base], strict=True))}
            for name, (bench, _, base) in benches.items()}


NNX_VARIANTS = {
    "linen_scan": "linen, lax.scan of steps (the product)",
    "nnx_scan": "NNX, state split through lax.scan (--api nnx)",
    "linen_step": "linen, one jitted step per call",
    "nnx_step": "NNX, state split, one jitted step per call",
}


def machine() -> dict:
    """Where the numbers come from."""
    return {"cpu": cpu_name(), "vector": vector_extensions(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            # The CPU's float32 peak: no yardstick for a step that runs on an accelerator.
            "peak_gflops": peak_gflops() if jax.default_backend() == "cpu" else None}


ABLATIONS = {
    "default": "fast kernels (flax_impl.extras.fast; lax.scan)",
    "first_layer_as_others": "first layer like the others (no im2col, XLA forward)",
    "gather_rotation": "rotation by gathering (map_coordinates)",
    "stock_pool": "XLA's own max-pool gradient (nn.max_pool)",
    "python_loop": "Python loop of jitted single steps",
    "stock_conv": "XLA's own convolution gradients (stock nn.Conv)",
    "stock": "stock Flax: nn.Conv, nn.max_pool, gather rotation",
}


def ablation_lines(timed: dict) -> list[str]:
    """One line per variant `ablation` timed: its label, ms per step and slow-down."""
    return [f"  {label:<58} {timed[name]['median_ms']:7.1f} ms  {timed[name]['slowdown']:5.2f}x"
            for name, label in ABLATIONS.items() if name in timed]


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
        add(f"full epoch ({results.get('steps_per_epoch', 468)} steps)", f["epoch_seconds"],
            t["epoch_seconds"], "s", False)
    flops = results["train_flops_per_image"]
    achieved = flops * 1e3 / f["step"]["median_ms"] * batch / 1e9
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, [30, 20, 20, 16], strict=True)).rstrip()
             for r in rows]
    lines += ["", "flax/torch speed > 1: flax is faster. Paired rounds: each round times one flax "
                  "scan call, then as many\ntorch steps; their ratio's median over the rounds "
                  "(drift in the machine's speed cancels out)."]
    if "ablation" in results:
        lines += ["", "flax with each fast kernel undone, timed in turns with the fast kernels "
                      "(median ms per train step, slow-down against them):"]
        lines += ablation_lines(results["ablation"])
    if "nnx" in results:
        lines += ["", "the NNX port against linen, timed in turns (median ms per train step, "
                      "slow-down against linen at the same steps per call; compile time):"]
        for name, label in NNX_VARIANTS.items():
            a = results["nnx"][name]
            lines.append(f"  {label:<62} {a['median_ms']:7.1f} ms  {a['slowdown']:5.2f}x  "
                         f"{a['warmup_seconds']:5.1f} s")
    cache = results.get("compilation_cache")
    lines.append(f"compilation cache: {cache} (what it holds loads instead of compiling; "
                 f"MNIST20K_JAX_CACHE=off times a cold compile)" if cache else
                 "compilation cache: off (the compile times are cold)")
    m = results["machine"]
    peak = results["machine"].get("peak_gflops")
    of_peak = f" = {100 * achieved / peak:.0f} % of a {peak:.0f} GFLOP/s peak" if peak else ""
    lines += ["", f"training FLOPs per image of {results.get('model', 'net')} (convolutions and "
                  f"head, forward and gradients): "
                  f"{flops / 1e6:.2f} M; achieved: flax {achieved:.1f} GFLOP/s{of_peak}",
              f"machine: {m['cpu']} ({m.get('vector', 'vector extensions not recorded')}), "
              f"{m['cores']} cores{'; ' + m['gpu'] if m.get('gpu') else ''}; "
              f"jax {m['jax']} ({m['jax_backend']}, "
              f"{len(m['jax_devices'])} device(s)), torch {m['torch']} "
              f"({results['torch']['threads']} threads), python {m['python']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = OneLineParser(prog="python -m compare.speed", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=390, help="train steps timed per framework")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="Flax steps per jitted scan (default: the product's)")
    parser.add_argument("--no-epoch", action="store_true", help="skip the full-epoch timing")
    parser.add_argument("--ablation", action="store_true",
                        help="also time Flax with each fast kernel undone, and stock Flax "
                             "(slow: six more compiles)")
    parser.add_argument("--nnx", action="store_true",
                        help="also time the NNX port (--api nnx) beside linen: the scan of steps "
                             "and single steps")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--data-source", default="auto")
    parser.add_argument("--recipe", default="default", choices=RECIPES,
                        help="the recipe (and its network) to time")
    args = parser.parse_args(argv)
    cache = use_compilation_cache()
    config = recipe_config(args.recipe, data_source=args.data_source)
    try:
        check_backend()
        data = load_mnist(args.data_source)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    steps_per_call = args.steps_per_call or STEPS_PER_CALL
    results = {"batch_size": config.batch_size, "steps_per_call": steps_per_call,
               "machine": machine(), "compilation_cache": str(cache) if cache else None}
    rounds = max(1, args.steps // steps_per_call)
    results.update(side_by_side(FlaxBench(data, config, steps_per_call), TorchBench(data, config),
                                rounds, not args.no_epoch))
    if args.ablation:
        results["ablation"] = ablation(data, config, max(1, rounds // 2), steps_per_call)
    if args.nnx:
        results["nnx"] = nnx_comparison(data, config, max(1, rounds // 2), steps_per_call)
    print(report(results))
    if args.json:
        try:
            write_output(args.json, lambda file: file.write(json.dumps(results, indent=2).encode()))
        except (ConfigError, OSError) as error:
            print(f"error: cannot write {args.json}: {first_line(error)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
