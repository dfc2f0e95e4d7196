"""Weights between the frameworks: `torch_to_flax(state_dict)` and `flax_to_torch(variables)`;
for the NNX port, `linen_to_nnx` / `nnx_to_linen` and `torch_to_nnx` / `nnx_to_torch`.

Per key, a rename and a layout change (as HuggingFace's PyTorch<->Flax conversion does):

| Flax                             | torch                  | layout                      |
|----------------------------------|------------------------|-----------------------------|
| params/M/kernel (conv, HWIO)     | M.weight (OIHW)        | transpose (3, 2, 0, 1)      |
| params/M/kernel (dense, in x out)| M.weight (out x in)    | transpose                   |
| params/M/bias                    | M.bias                 |                             |
| params/M/scale (BatchNorm)       | M.weight               |                             |
| batch_stats/M/mean, var          | M.running_mean, running_var (both unbiased, see model.py) |

Module paths map `a/b` <-> `a.b`. torch's `num_batches_tracked` has no Flax counterpart (it only
matters for BatchNorm without momentum) and comes back as 0. An NNX module's state, split into
`nnx.Param` and `nnx.BatchStat` as pure dicts, is linen's variables: the same names, shapes and
layouts, so linen <-> NNX is a check of every key and shape and no change of any value. Every
key and shape is checked against the target model; anything wrong or missing is one
`ConversionError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util

from compare import seednet
from flax_impl import nnx_model
from flax_impl.common.models import MODELS
from flax_impl.model import create_model as create_flax_model
from torch_ref.model import create_model as create_torch_model

MODEL_NAMES = (*MODELS, "seednet")  # the model table's networks and the seed README's

TORCH_STATS = {"mean": "running_mean", "var": "running_var"}


class ConversionError(ValueError):
    """A key or shape that does not fit the target model, named in one line."""


def linen_model(name: str, widths: tuple[int, ...] | None = None, dropout: float = 0.0):
    """The linen network `name` (of MODEL_NAMES) at `widths` (default: its own)."""
    if name == "seednet":
        return seednet.LinenSeedNet(widths or seednet.SEEDNET_WIDTHS)
    return create_flax_model(name, dropout, widths)


def nnx_module(name: str, widths: tuple[int, ...] | None = None, dropout: float = 0.0,
               rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The NNX network `name` (of MODEL_NAMES) at `widths`, drawn from `rngs` (default: seed 0)."""
    rngs = rngs or nnx.Rngs(0)
    if name == "seednet":
        return seednet.NnxSeedNet(widths or seednet.SEEDNET_WIDTHS, rngs=rngs)
    return nnx_model.create_model(name, dropout, widths, rngs=rngs)


def torch_model(name: str, widths: tuple[int, ...] | None = None, dropout: float = 0.0
                ) -> torch.nn.Module:
    """The torch network `name` (of MODEL_NAMES) at `widths` (default: its own)."""
    if name == "seednet":
        return seednet.TorchSeedNet(widths or seednet.SEEDNET_WIDTHS)
    return create_torch_model(name, dropout, widths)


def torch_name(collection: str, path: tuple[str, ...], ndim: int) -> str:
    """The torch state_dict key of a Flax variable (collection, path)."""
    module, leaf = ".".join(path[:-1]), path[-1]
    if collection == "batch_stats":
        return f"{module}.{TORCH_STATS[leaf]}"
    return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    """A Flax array in torch's layout (kernels transposed, everything else unchanged)."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def to_flax_layout(value: np.ndarray) -> np.ndarray:
    """A torch array in Flax's layout (the inverse of `to_torch_layout`)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def flax_shapes(model: str, widths: tuple[int, ...] | None = None
                ) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
    """{(collection, path): shape} of the Flax model's variables, without computing them."""
    shapes = jax.eval_shape(lambda: linen_model(model, widths).init(
        jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32)))
    return {(collection, path): tuple(leaf.shape)
            for collection, tree in shapes.items()
            for path, leaf in traverse_util.flatten_dict(tree).items()}


def torch_shapes(model: str, widths: tuple[int, ...] | None = None) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the torch model's state_dict."""
    return {k: tuple(v.shape)
            for k, v in torch_model(model, widths).state_dict().items()}


def torch_to_flax(state_dict: dict, model: str = "net",
                  widths: tuple[int, ...] | None = None) -> dict:
    """torch state_dict -> Flax variables {"params": ..., "batch_stats": ...} (numpy arrays) of
    `model` at `widths` (default: its own)."""
    expected = flax_shapes(model, widths)
    names = {torch_name(c, p, len(s)): (c, p) for (c, p), s in expected.items()}
    known = set(names) | {k for k in torch_shapes(model, widths)
                          if k.endswith("num_batches_tracked")}
    extra = sorted(set(state_dict) - known)
    if extra:
        raise ConversionError(f"unexpected key {extra[0]!r} in the torch state_dict for {model}")
    flat: dict = {}
    for name, (collection, path) in names.items():
        if name not in state_dict:
            raise ConversionError(f"missing key {name!r} in the torch state_dict for {model}")
        value = to_flax_layout(state_dict[name].detach().cpu().numpy())
        if value.shape != expected[collection, path]:
            raise ConversionError(
                f"{name!r} has shape {list(state_dict[name].shape)}, {model} needs "
                f"{list(to_torch_layout(np.empty(expected[collection, path])).shape)}")
        flat[(collection, *path)] = np.array(value, order="C")  # a copy, never a view of torch's
    return traverse_util.unflatten_dict(flat)


def checked_flax_variables(variables: dict, model: str = "net",
                           widths: tuple[int, ...] | None = None) -> dict:
    """{(collection, path): array} of Flax variables, every key and shape checked against
    `model` at `widths` (ConversionError naming the first wrong one)."""
    expected = flax_shapes(model, widths)
    given = {(c, p): v for c, tree in variables.items()
             for p, v in traverse_util.flatten_dict(dict(tree)).items()}
    extra = sorted(set(given) - set(expected))
    if extra:
        raise ConversionError(f"unexpected variable {'/'.join((extra[0][0], *extra[0][1]))!r} "
                              f"for {model}")
    checked = {}
    for (collection, path), shape in expected.items():
        where = "/".join((collection, *path))
        if (collection, path) not in given:
            raise ConversionError(f"missing variable {where!r} for {model}")
        value = np.asarray(given[collection, path])
        if value.shape != shape:
            raise ConversionError(f"{where!r} has shape {list(value.shape)}, {model} needs "
                                  f"{list(shape)}")
        checked[collection, path] = value
    return checked


def flax_to_torch(variables: dict, model: str = "net",
                  widths: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """Flax variables of `model` at `widths` (default: its own) -> torch state_dict (loads with
    `load_state_dict(strict=True)`)."""
    state_dict = {torch_name(collection, path, value.ndim): torch.from_numpy(
                      np.ascontiguousarray(to_torch_layout(value)).copy())
                  for (collection, path), value in checked_flax_variables(
                      variables, model, widths).items()}
    for name in torch_shapes(model, widths):
        if name.endswith("num_batches_tracked"):
            state_dict[name] = torch.tensor(0)
    return state_dict


def linen_to_nnx(variables: dict, model: str = "net", widths: tuple[int, ...] | None = None,
                 dropout: float = 0.0, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """linen variables of `model` -> the NNX module holding them (every key and shape checked;
    its dropout draws from `rngs`)."""
    checked = checked_flax_variables(variables, model, widths)
    module = nnx_module(model, widths, dropout, rngs)
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        state = nnx.state(module, kind)
        nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
            {path: jnp.asarray(v) for (c, path), v in checked.items() if c == collection}))
        nnx.update(module, state)
    return module


def nnx_to_linen(module: nnx.Module, model: str = "net",
                 widths: tuple[int, ...] | None = None) -> dict:
    """An NNX module of `model` -> linen variables (numpy arrays; every key and shape checked)."""
    checked = checked_flax_variables(nnx_model.variables_of(module), model, widths)
    return traverse_util.unflatten_dict({(c, *p): np.array(v) for (c, p), v in checked.items()})


def torch_to_nnx(state_dict: dict, model: str = "net", widths: tuple[int, ...] | None = None,
                 dropout: float = 0.0, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """torch state_dict -> the NNX module of `model` holding its weights."""
    return linen_to_nnx(torch_to_flax(state_dict, model, widths), model, widths, dropout, rngs)


def nnx_to_torch(module: nnx.Module, model: str = "net",
                 widths: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """An NNX module of `model` -> torch state_dict (loads with `load_state_dict(strict=True)`)."""
    return flax_to_torch(nnx_to_linen(module, model, widths), model, widths)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: convert a saved model between the frameworks."""
    import argparse
    import functools
    import sys

    from flax_impl.common.atomic import write_output
    from flax_impl.common.config import OneLineParser
    from flax_impl.common.errors import ConfigError

    parser = OneLineParser(prog="python -m compare.convert", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a torch state_dict (.pt, e.g. a "
                        "torch_ref.train workdir's model.pt) or Flax variables (.npz)")
    parser.add_argument("target", type=Path, help="where the other framework's file goes "
                        "(.npz for Flax, .pt for torch)")
    parser.add_argument("--model", choices=MODEL_NAMES, default="net")
    args = parser.parse_args(argv)
    try:
        if args.source.suffix == ".pt":
            state_dict = torch.load(args.source, map_location="cpu", weights_only=True)
            variables = traverse_util.flatten_dict(torch_to_flax(state_dict, args.model), sep="/")
            write = functools.partial(np.savez, **variables)  # to a file: no ".npz" appended
        else:
            with np.load(args.source) as saved:
                flat = {tuple(key.split("/")): saved[key] for key in saved.files}
            state_dict = flax_to_torch(traverse_util.unflatten_dict(flat), args.model)
            write = functools.partial(torch.save, state_dict)
        write_output(args.target, write, inputs=[args.source])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"error: cannot convert {args.source}: {reason}", file=sys.stderr)
        return 2
    print(f"wrote {args.target} ({args.model})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
