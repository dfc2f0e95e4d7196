"""The docs name real things: every test the porting guide cites exists, every link resolves,
every command and flag the README shows exists."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
# The README is what a newcomer reads before anything else: a page of about five minutes.
README_BUDGET = 9_000


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_docs_name_exists():
    pages = [ROOT / "docs" / "porting.md", ROOT / "docs" / "faults.md", ROOT / "README.md"]
    cited = [found for page in pages for found in CITED.findall(page.read_text())]
    assert len(cited) >= 12
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file)]
    assert not missing


def test_the_check_sees_which_tests_a_file_defines():
    found = defined_tests(ROOT / "tests" / "test_docs.py")
    assert "test_every_test_the_docs_name_exists" in found
    assert "test_nothing_here" not in found


def test_readme_and_docs_link_only_to_files_that_exist():
    for page in [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


def test_every_command_the_readme_shows_is_a_module_with_a_main():
    modules = set(re.findall(r"python -m ((?:flax_impl|torch_ref|compare)\.\w+)",
                             (ROOT / "README.md").read_text()))
    assert {"flax_impl.train", "torch_ref.train", "compare.parity"} <= modules
    for module in modules:
        text = Path(importlib.util.find_spec(module).origin).read_text()
        assert re.search(r"^(def main\(|main = )", text, re.M), module
        assert 'if __name__ == "__main__":' in text, module


def test_every_training_flag_the_readme_names_is_accepted():
    from flax_impl.common.config import build_parser
    from flax_impl.extras import distributed
    from flax_impl.train import main  # noqa: F401  (the parsers below are the commands')

    flax = build_parser("flax", "", "flax")
    distributed.add_flags(flax)
    known = {option for action in flax._actions for option in action.option_strings}
    known |= {"--device"}  # torch's own, added by torch_ref.train.main
    section = (ROOT / "README.md").read_text().split("Both trainers take")[1].split("\n\n")[0]
    named = set(re.findall(r"`(--[a-z-]+)", section))
    assert len(named) >= 20
    assert named <= known, named - known


def test_the_readme_stays_within_its_budget():
    assert len((ROOT / "README.md").read_text()) <= README_BUDGET
