"""The package's layering: the modules both frameworks share (flax_impl.common) load neither jax
nor torch; the reference and the port import nothing of each other (but the shared modules);
the reading path reaches no optional layer, and train.py reaches them only through
flax_impl.extras. And the workdir files the shared modules write as epochs end."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import flax_impl.common

ROOT = Path(__file__).resolve().parent.parent
COMMON = sorted(f"flax_impl.common.{m.name}" for m in pkgutil.iter_modules(flax_impl.common.__path__))
FRAMEWORKS = ("jax", "torch", "flax", "optax", "orbax")

SCRIPT = f"""
import importlib, json, sys
def loaded():
    return sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)
for name in {COMMON!r}:
    importlib.import_module(name)
common = loaded()
import flax_impl.model  # the check's control: a module that does load one
print(json.dumps([common, loaded()]))
"""


def test_every_common_module_imports_neither_jax_nor_torch():
    assert {"flax_impl.common.config", "flax_impl.common.workdir", "flax_impl.common.signals",
            "flax_impl.common.errors", "flax_impl.common.data"} <= set(COMMON)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    common, control = json.loads(result.stdout)
    assert common == []
    assert "jax" in control  # the check sees a framework that is loaded


def imported_modules(path: Path) -> set[str]:
    """The modules a source file imports (absolute names, every `import` and `from` in it, at
    any depth, the deferred ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): imported_modules(path)
            for path in sorted((ROOT / package).rglob("*.py"))}


def test_the_import_reader_sees_deferred_and_aliased_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import a.b as c\nfrom d import e\n\ndef f():\n    from g.h import i\n")
    assert imported_modules(source) == {"a.b", "d", "d.e", "g.h", "g.h.i"}


def test_the_reference_imports_nothing_of_the_port_but_its_common_modules():
    for path, names in package_imports("torch_ref").items():
        port = {n for n in names if n.split(".")[0] == "flax_impl"}
        assert all(n.startswith("flax_impl.common") for n in port), (path, port)


def test_the_port_imports_neither_its_reference_nor_its_proof():
    for path, names in package_imports("flax_impl").items():
        assert not {n for n in names if n.split(".")[0] in ("torch_ref", "compare", "torch")}, path


# The files a reader opens to see the whole training (issue #41): the optional layers (the CPU
# kernels, several processes, the compilation cache) are not theirs to import.
READING_PATH = ("flax_impl/model.py", "flax_impl/nnx_model.py", "flax_impl/core.py",
                "flax_impl/nnx_train.py", "flax_impl/augment.py")
OPTIONAL = ("kernels", "distributed", "compile_cache", "fast")


def test_the_reading_path_imports_no_optional_layer():
    imports = package_imports("flax_impl")
    for path in READING_PATH:
        reached = {n for n in imports[path] if n.startswith("flax_impl.")
                   and ("extras" in n or set(n.split(".")) & set(OPTIONAL))}
        assert not reached, (path, reached)


def test_train_reaches_the_optional_layers_only_through_flax_impl_extras():
    names = {n for n in imported_modules(ROOT / "flax_impl/train.py")
             if n.startswith("flax_impl.")}
    # Besides the shared modules and the extras: the reading path, and nothing else.
    beside = {n.split(".")[1] for n in names} - {"common", "extras"}
    assert beside <= {Path(path).stem for path in READING_PATH}, beside
    assert {"flax_impl.extras.distributed", "flax_impl.extras.compile_cache",
            "flax_impl.extras.kernels"} <= names
    # and no optional layer lives beside the reading path (compile_cache moved to extras)
    stems = {path.stem for path in (ROOT / "flax_impl").glob("*.py")}
    assert not stems & {*OPTIONAL, "setup"}, stems & {*OPTIONAL, "setup"}


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


def test_epoch_files_without_a_workdir_write_nothing_and_end_quietly(tmp_path, monkeypatch):
    from flax_impl.common.workdir import EpochFiles

    monkeypatch.chdir(tmp_path)  # where a relative path would land
    records = [{"epoch": 1, "train_loss": 0.5, "test_loss": 0.1, "test_accuracy": 0.9,
                "seconds": 1.0}]
    with EpochFiles(None, redraw_seconds=0) as files:  # a run without --workdir
        files.write(records)
    with pytest.raises(KeyboardInterrupt), EpochFiles(None) as files:
        files.write(records)
        raise KeyboardInterrupt  # its own error, not one of drawing
    assert os.listdir(tmp_path) == []
