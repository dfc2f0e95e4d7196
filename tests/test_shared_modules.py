"""The modules both frameworks share (flax_impl.common) load neither jax nor torch."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import flax_impl.common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = sorted(f"flax_impl.common.{m.name}" for m in pkgutil.iter_modules(flax_impl.common.__path__))

SCRIPT = f"""
import importlib, json, sys
for name in {COMMON!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in ("jax", "torch", "flax", "optax") if m in sys.modules)))
"""


def test_every_common_module_imports_neither_jax_nor_torch():
    assert "flax_impl.common.config" in COMMON and "flax_impl.common.workdir" in COMMON
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    assert json.loads(result.stdout) == []


def test_the_check_sees_a_framework_that_is_imported():
    result = subprocess.run([sys.executable, "-c", "import flax_impl.model\n" + SCRIPT], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    assert "jax" in json.loads(result.stdout)


def imported_modules(path) -> set[str]:
    """The modules a source file imports (absolute names, every `import` and `from` in it)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    from pathlib import Path

    return {str(path.relative_to(ROOT)): imported_modules(path)
            for path in sorted(Path(ROOT, package).rglob("*.py"))}


def test_the_reference_imports_nothing_of_the_port_but_its_common_modules():
    for path, names in package_imports("torch_ref").items():
        port = {n for n in names if n.split(".")[0] == "flax_impl"}
        assert all(n.startswith("flax_impl.common") for n in port - {"flax_impl"}), (path, port)
        assert "flax_impl" not in names, path


def test_the_port_imports_neither_its_reference_nor_its_proof():
    for path, names in package_imports("flax_impl").items():
        assert not {n for n in names if n.split(".")[0] in ("torch_ref", "compare", "torch")}, path


def test_the_stock_model_and_core_import_no_optional_layer():
    imports = package_imports("flax_impl")
    for path in ("flax_impl/model.py", "flax_impl/core.py", "flax_impl/augment.py"):
        assert not {n for n in imports[path] if "extras" in n or n.endswith("distributed")}, path
    optional = {n for n in imports["flax_impl/train.py"] if "extras" in n}
    assert not optional, "train.py reaches the optional layers through flax_impl.setup"


def test_epoch_files_rewrite_the_metrics_each_epoch_and_the_curves_when_due(tmp_path):
    from flax_impl.common.workdir import EpochFiles, read_metrics

    records = [{"epoch": e, "train_loss": 0.5 / e, "test_loss": 0.1 / e,
                "test_accuracy": 0.9 + 0.01 * e, "seconds": 1.0} for e in (1, 2, 3)]
    curves = tmp_path / "curves.png"
    with EpochFiles(tmp_path, redraw_seconds=3600) as files:
        files.write(records[:1])
        first = curves.read_bytes()  # the first epoch is drawn at once
        files.write(records[:2])
        assert read_metrics(tmp_path / "metrics.jsonl") == records[:2]
        assert curves.read_bytes() == first  # not due yet
    assert curves.read_bytes() != first  # drawn as the run ends
    with EpochFiles(tmp_path, redraw_seconds=0) as files:
        files.write(records[:2])
        drawn = curves.read_bytes()
        files.write(records)
        assert curves.read_bytes() != drawn  # due at every epoch


def test_epoch_files_draw_what_they_hold_when_the_run_stops_with_an_error(tmp_path):
    from flax_impl.common.workdir import EpochFiles

    records = [{"epoch": e, "train_loss": 0.5, "test_loss": 0.1, "test_accuracy": 0.9,
                "seconds": 1.0} for e in (1, 2)]
    with pytest.raises(KeyboardInterrupt), EpochFiles(tmp_path, redraw_seconds=3600) as files:
        files.write(records[:1])
        first = (tmp_path / "curves.png").read_bytes()
        files.write(records)
        raise KeyboardInterrupt
    assert (tmp_path / "curves.png").read_bytes() != first
    with EpochFiles(None) as files:  # no workdir: nothing written, nothing to draw
        files.write(records)
