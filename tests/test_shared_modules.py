"""The modules both frameworks share load neither jax nor torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import json, sys
import flax_impl.atomic, flax_impl.config, flax_impl.data, flax_impl.rendezvous, flax_impl.reporting
print(json.dumps(sorted(m for m in ("jax", "torch", "flax", "optax") if m in sys.modules)))
"""


def test_config_data_and_reporting_import_neither_jax_nor_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    assert json.loads(result.stdout) == []


def test_the_check_sees_a_framework_that_is_imported():
    result = subprocess.run([sys.executable, "-c", "import flax_impl.model\n" + SCRIPT], cwd=ROOT,
                            check=True, capture_output=True, text=True)
    assert "jax" in json.loads(result.stdout)
