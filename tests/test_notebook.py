"""notebooks/walkthrough.ipynb: committed with its outputs, and it runs top to bottom."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"
SHORT_RUN_IMAGES = "15_360"  # the committed notebook's short run
TESTED_RUN_IMAGES = "1_280"  # the tests': 2 epochs of 10 steps (the torch run: one of 10)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    return "".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
                   for output in cell.outputs)


def test_committed_with_outputs_and_the_short_recipe():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(notebook)
    assert "FULL_RECIPE = False" in cells[0].source  # the switches, at the top
    assert f"SHORT_RUN_IMAGES = {SHORT_RUN_IMAGES}" in cells[0].source
    assert all(cell.execution_count for cell in cells)
    assert all(cell.outputs for cell in cells[1:])
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    pictures = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert pictures == 2  # the training curves and the predicted digits
    sources = "\n".join(cell.source for cell in notebook.cells)
    assert "flax_impl import setup" not in sources and "SeedNet" not in sources  # gone
    assert "nnx.Optimizer" in sources and "nnx.Rngs" in sources  # NNX as NNX users write it


@pytest.mark.slow
@pytest.mark.realdata
def test_it_runs_top_to_bottom(monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.delenv("MNIST20K_CACHE")  # the real MNIST, as a reader has it
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The short run smaller: what is tested is that every cell runs and what it prints.
    switches = code_cells(notebook)[0]
    switches.source = switches.source.replace(f"SHORT_RUN_IMAGES = {SHORT_RUN_IMAGES}",
                                              f"SHORT_RUN_IMAGES = {TESTED_RUN_IMAGES}")
    assert f"SHORT_RUN_IMAGES = {TESTED_RUN_IMAGES}" in switches.source
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    texts = [text_of(cell) for cell in code_cells(notebook)]
    assert "verdict: MATCH; under 20,000 parameters" in texts[3]
    assert texts[4].count("PASS") == 2 and "FAIL" not in texts[4]
    digits = [line for line in texts[4].splitlines() if line.startswith(("torch's", "Flax's"))]
    assert digits[0].split(":")[1].strip() == digits[1].split(":")[1].strip()  # same digits
    assert texts[5].count("Test set: Average loss") == 2
    steps = re.search(r"10 steps, the modules updated in place: loss (\S+) -> (\S+)", texts[6])
    assert float(steps[2]) < float(steps[1])  # the NNX step learns
    nnx_gap = re.search(r"NNX against linen, largest difference of the log-probabilities: (\S+)",
                        texts[6])
    assert float(nnx_gap[1]) <= 1e-5
