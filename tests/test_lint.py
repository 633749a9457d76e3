"""Lint is part of the suite: ruff with the rules pyproject.toml selects."""

import subprocess
import sys

import pytest
from harness import ROOT


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[test]')")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "edgeproxy", "tests", "bench", "examples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
