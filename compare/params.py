"""Per-layer trainable parameter counts, Flax linen, Flax NNX and torch: `python -m compare.params
[--model M]`.

Counts come from the real models (linen `init` shapes, the NNX module's `nnx.Param`s, torch
`named_parameters`), paired through the weight conversion's naming (compare/convert.py). Exit
status 0 only when every layer matches and each network with a budget in the model table
(`flax_impl.common.models`) stays under it.
`--widths` counts a network at other widths (against the model's budget).
"""

from __future__ import annotations

import json
import math
import sys

from flax import nnx, traverse_util

from compare.convert import MODEL_NAMES, flax_shapes, nnx_module, torch_model, torch_name
from flax_impl.common.config import OneLineParser
from flax_impl.common.models import MODELS, PARAMETER_LIMIT, SEEDNET_WIDTHS, parse_widths


def nnx_shapes(model: str, widths: tuple[int, ...] | None = None) -> dict:
    """{path: shape} of the NNX module's parameters (`nnx.Param`), without computing them."""
    abstract = nnx.eval_shape(lambda: nnx_module(model, widths))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


def parameter_table(model: str, widths: tuple[int, ...] | None = None) -> dict:
    """Rows pairing each Flax parameter with its torch twin, the totals and the verdict, for
    `model` at `widths` (default: its own)."""
    flax = {path: shape for (collection, path), shape in flax_shapes(model, widths).items()
            if collection == "params"}
    torch_params = {name: tuple(p.shape)
                    for name, p in torch_model(model, widths).named_parameters()
                    if p.requires_grad}
    nnx_params = nnx_shapes(model, widths)
    rows, paired = [], set()
    for path, shape in flax.items():
        name = torch_name("params", path, len(shape))
        torch_shape = torch_params.get(name)
        paired.add(name)
        flax_count = math.prod(shape)
        torch_count = math.prod(torch_shape) if torch_shape is not None else 0
        nnx_shape = nnx_params.get(path)
        rows.append({"layer": "/".join(path[:-1]), "flax_path": "/".join(path),
                     "flax_shape": list(shape), "nnx_shape": list(nnx_shape or ()) or None,
                     "torch_name": name if torch_shape else None,
                     "torch_shape": list(torch_shape) if torch_shape else None,
                     "flax_count": flax_count, "torch_count": torch_count,
                     "nnx_count": math.prod(nnx_shape) if nnx_shape else 0,
                     "match": flax_count == torch_count and nnx_shape == shape})
    for name, shape in torch_params.items():
        if name not in paired:
            rows.append({"layer": name.rsplit(".", 1)[0], "flax_path": None, "flax_shape": None,
                         "nnx_shape": None, "torch_name": name, "torch_shape": list(shape),
                         "flax_count": 0, "torch_count": math.prod(shape), "nnx_count": 0,
                         "match": False})
    for path, shape in nnx_params.items():
        if path not in flax:
            rows.append({"layer": "/".join(path[:-1]), "flax_path": None, "flax_shape": None,
                         "nnx_shape": list(shape), "torch_name": None, "torch_shape": None,
                         "flax_count": 0, "torch_count": 0, "nnx_count": math.prod(shape),
                         "match": False})
    flax_total = sum(r["flax_count"] for r in rows)
    torch_total = sum(r["torch_count"] for r in rows)
    nnx_total = sum(r["nnx_count"] for r in rows)
    match = all(r["match"] for r in rows) and flax_total == torch_total == nnx_total
    budget = MODELS[model].budget if model in MODELS else None  # SeedNet: none
    under = flax_total < (budget or PARAMETER_LIMIT)
    default_widths = MODELS[model].widths if model in MODELS else SEEDNET_WIDTHS
    return {"model": model, "widths": list(widths or default_widths), "budget": budget,
            "rows": rows, "flax_total": flax_total, "torch_total": torch_total,
            "nnx_total": nnx_total,
            "match": match, "under_limit": under, "ok": match and (under or budget is None)}


def format_table(table: dict) -> str:
    """The table as aligned text with the verdict."""
    header = ("layer", "flax path", "linen shape", "nnx shape", "torch name", "torch shape",
              "count", "")
    lines = [header]
    for r in table["rows"]:
        count = (f"{r['flax_count']:,}" if r["match"]
                 else f"{r['flax_count']:,} vs {r['nnx_count']:,} vs {r['torch_count']:,}")
        lines.append((r["layer"], r["flax_path"] or "-", str(tuple(r["flax_shape"] or ())),
                      str(tuple(r["nnx_shape"] or ())), r["torch_name"] or "-",
                      str(tuple(r["torch_shape"] or ())), count,
                      "" if r["match"] else "MISMATCH"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"== {table['model']} (widths {','.join(map(str, table['widths']))}) =="]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in lines]
    text.append(f"total: linen {table['flax_total']:,}, nnx {table['nnx_total']:,}, torch "
                f"{table['torch_total']:,}")
    verdict = "MATCH" if table["match"] else "MISMATCH"
    if table["budget"] is not None:
        limit = "under" if table["under_limit"] else "NOT under"
        verdict += f"; {limit} {table['budget']:,} parameters"
    else:
        verdict += (f"; {table['flax_total'] / PARAMETER_LIMIT:.0f}x the "
                    f"{PARAMETER_LIMIT:,}-parameter budget")
    text.append(f"verdict: {verdict}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = OneLineParser(prog="python -m compare.params", description=__doc__)
    parser.add_argument("--model", choices=(*MODEL_NAMES, "all"), default="net")
    parser.add_argument("--widths", type=parse_widths, default=None, metavar="W1,W2,...",
                        help="count --model at these widths (one per conv block) instead of its own")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.widths is not None and args.model == "all":
        parser.error("--widths needs one --model")
    models = MODEL_NAMES if args.model == "all" else (args.model,)
    try:
        tables = [parameter_table(model, args.widths) for model in models]
    except ValueError as error:  # widths that do not fit the model's layout
        parser.error(str(error))
    if args.json:
        print(json.dumps(tables if args.model == "all" else tables[0], indent=2))
    else:
        print("\n\n".join(format_table(table) for table in tables))
    return 0 if all(table["ok"] for table in tables) else 1


if __name__ == "__main__":
    sys.exit(main())
