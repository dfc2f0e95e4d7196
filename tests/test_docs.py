"""The docs name real things: every test the porting guide cites exists, every link resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_porting_guide_names_exists():
    cited = CITED.findall((ROOT / "docs" / "porting.md").read_text())
    assert len(cited) >= 12
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file)]
    assert not missing


def test_the_check_sees_which_tests_a_file_defines():
    found = defined_tests(ROOT / "tests" / "test_docs.py")
    assert "test_every_test_the_porting_guide_names_exists" in found
    assert "test_nothing_here" not in found


def test_readme_and_docs_link_only_to_files_that_exist():
    for page in [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text()) <= 12_000
