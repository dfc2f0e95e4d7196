"""Where the training step's time goes: `Net`'s convolutions one by one, Flax vs torch.

`python -m compare.layers [--json FILE]` times, for each 3x3 convolution of `Net` at the recipe's
batch size, the forward pass and the backward pass (the gradients training needs: the kernel's,
and the input's except for the first layer) with `flax_impl.extras.fast.conv` under `jax.jit` and with
`torch.nn.functional.conv2d` under autograd, alternating the two; medians in ms.

`--conv-forms` times instead the forward pass of each convolution past the first written five
ways on XLA: `lax.conv_general_dilated` (conv), the nine shifted inputs side by side in one
product (im2col), nine products summed (pertap), a kernel row's three taps side by side in three
products (rows), and the input channels padded to a multiple of 8 (pad8); a form whose result
differs from conv's is marked WRONG. A benchmark: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax import lax

from compare.machine import cpu_name, vector_extensions
from flax_impl.common.config import Config
from flax_impl.common.models import MODELS
from flax_impl.extras.fast.conv import conv_valid
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


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run()` in ms, after two warm-up calls."""
    run(), run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_layer(shape: tuple[int, int, int, int], out_channels: int, first: bool,
               repeats: int) -> dict:
    """Forward and backward ms of one convolution, both frameworks, taken in turns."""
    batch, channels, height, width = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, height, width, channels), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, channels, out_channels), dtype=np.float32)
    grad = rng.standard_normal((batch, height - 2, width - 2, out_channels), dtype=np.float32)

    wanted = (1,) if first else (0, 1)  # the first layer's input needs no gradient
    flax_forward = jax.jit(conv_valid)
    flax_backward = jax.jit(lambda x, k, g: [jax.vjp(conv_valid, x, k)[1](g)[i] for i in wanted])
    jx, jk, jg = jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(grad)

    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(not first)
    tk = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tg = torch.from_numpy(grad).permute(0, 3, 1, 2).contiguous()
    inputs = [tk] if first else [tx, tk]

    def torch_forward():
        with torch.no_grad():
            return F.conv2d(tx, tk)

    output = F.conv2d(tx, tk)
    timings = {name: [] for name in ("flax_forward", "flax_backward", "torch_forward",
                                      "torch_backward")}
    for _ in range(3):  # in turns, so that both frameworks see the same machine
        timings["flax_forward"].append(median_ms(
            lambda: jax.block_until_ready(flax_forward(jx, jk)), repeats))
        timings["flax_backward"].append(median_ms(
            lambda: jax.block_until_ready(flax_backward(jx, jk, jg)), repeats))
        timings["torch_forward"].append(median_ms(torch_forward, repeats))
        timings["torch_backward"].append(median_ms(
            lambda: torch.autograd.grad(output, inputs, tg, retain_graph=True), repeats))
    return {name: statistics.median(values) for name, values in timings.items()}


KEYS = ("flax_forward", "torch_forward", "flax_backward", "torch_backward")


def report(rows: list[dict]) -> str:
    """The per-layer table, with totals and Flax/torch speed ratios (above 1: Flax is faster)."""
    total = {"name": "total", "input": "", **{key: sum(row[key] for row in rows) for key in KEYS}}
    lines = [f"{'layer':<14}{'input (NCHW) -> out':<24}{'flax fwd':>10}{'torch fwd':>11}"
             f"{'speed':>7}{'flax bwd':>11}{'torch bwd':>11}{'speed':>7}"]
    for row in rows + [total]:
        lines.append(
            f"{row['name']:<14}{row['input']:<24}{row['flax_forward']:>8.2f}ms"
            f"{row['torch_forward']:>9.2f}ms{row['torch_forward'] / row['flax_forward']:>6.2f}x"
            f"{row['flax_backward']:>9.2f}ms{row['torch_backward']:>9.2f}ms"
            f"{row['torch_backward'] / row['flax_backward']:>6.2f}x")
    lines.append(f"{cpu_name()} ({vector_extensions()}); torch {torch.__version__} "
                 f"({torch.get_num_threads()} threads), jax {jax.__version__} "
                 f"({jax.default_backend()}); backward: the kernel gradient, "
                 f"and the input gradient except for the first layer")
    return "\n".join(lines)


NHWC = ("NHWC", "HWIO", "NHWC")


def conv_form(x: jax.Array, k: jax.Array) -> jax.Array:
    """A valid 3x3 convolution, NHWC x HWIO: XLA's own."""
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=NHWC)


def im2col_form(x: jax.Array, k: jax.Array) -> jax.Array:
    """The nine shifted inputs side by side, one matrix product."""
    height, width, channels, out = k.shape
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    windows = [x[:, i:i + oh, j:j + ow, :] for i in range(height) for j in range(width)]
    patches = jnp.concatenate(windows, -1).reshape(-1, height * width * channels)
    return (patches @ k.reshape(-1, out)).reshape(x.shape[0], oh, ow, out)


def pertap_form(x: jax.Array, k: jax.Array) -> jax.Array:
    """One product per kernel tap, summed."""
    height, width = k.shape[:2]
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    return sum(jnp.einsum("bhwc,co->bhwo", x[:, i:i + oh, j:j + ow, :], k[i, j])
               for i in range(height) for j in range(width))


def rows_form(x: jax.Array, k: jax.Array) -> jax.Array:
    """A kernel row's taps side by side: one product per row."""
    height, width, channels, out = k.shape
    oh, ow = x.shape[1] - height + 1, x.shape[2] - width + 1
    side_by_side = jnp.concatenate([x[:, :, j:j + ow, :] for j in range(width)], -1)
    return sum(jnp.einsum("bhwc,co->bhwo", side_by_side[:, i:i + oh],
                          k[i].reshape(width * channels, out)) for i in range(height))


def pad8_form(x: jax.Array, k: jax.Array) -> jax.Array:
    """XLA's convolution with the input channels padded to a multiple of 8."""
    extra = -x.shape[-1] % 8
    return conv_form(jnp.pad(x, ((0, 0),) * 3 + ((0, extra),)),
                     jnp.pad(k, ((0, 0),) * 2 + ((0, extra), (0, 0))))


CONV_FORMS = {"conv": conv_form, "im2col": im2col_form, "pertap": pertap_form,
              "rows": rows_form, "pad8": pad8_form}


def time_conv_forms(model_name: str, batch: int, repeats: int) -> list[dict]:
    """Per convolution of `model_name` past the first: each form's median forward ms and its
    largest difference from `conv_form`'s result."""
    rng = np.random.default_rng(0)
    rows = []
    for name, (_, channels, side, _), out in conv_shapes(batch, model_name)[1:]:
        x = jnp.asarray(rng.standard_normal((batch, side, side, channels), dtype=np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, channels, out), dtype=np.float32))
        reference = np.asarray(conv_form(x, k))
        row = {"name": name, "input": f"{batch}x{side}x{side}x{channels} -> {out}"}
        for form_name, form in CONV_FORMS.items():
            jitted = jax.jit(form)
            row[form_name] = median_ms(
                lambda f=jitted, x=x, k=k: jax.block_until_ready(f(x, k)), repeats)
            row[f"{form_name}_error"] = float(np.abs(np.asarray(jitted(x, k)) - reference).max())
        rows.append(row)
    return rows


def conv_forms_report(rows: list[dict], model_name: str) -> str:
    """The forms table: median forward ms per form and convolution (WRONG: a differing result)."""
    lines = [f"{'layer':<14}{'input (NHWC) -> out':<24}" + "".join(f"{f:>14}" for f in CONV_FORMS)]
    for row in rows:
        cells = [f"{row[f]:.2f}ms" + (" WRONG" if row[f"{f}_error"] > 1e-3 else "")
                 for f in CONV_FORMS]
        lines.append(f"{row['name']:<14}{row['input']:<24}" + "".join(f"{c:>14}" for c in cells))
    lines.append(f"{model_name}'s convolutions past the first, forward only; {cpu_name()} "
                 f"({vector_extensions()}), jax {jax.__version__} ({jax.default_backend()})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m compare.layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="net")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--conv-forms", action="store_true",
                        help="time five forms of each convolution's forward pass instead")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    batch = Config().batch_size
    if args.conv_forms:
        rows = time_conv_forms(args.model, batch, args.repeats)
        print(conv_forms_report(rows, args.model))
    else:
        rows = []
        for index, (name, shape, out_channels) in enumerate(conv_shapes(batch, args.model)):
            rows.append({"name": name,
                         "input": "x".join(map(str, shape)) + f" -> {out_channels}",
                         **time_layer(shape, out_channels, index == 0, args.repeats)})
        print(report(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
