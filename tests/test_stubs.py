"""The compiled module's stubs name only what the module has."""

import ast
from pathlib import Path

import pytest

ext = pytest.importorskip("edgeproxy._ext")


def test_every_stubbed_name_exists():
    tree = ast.parse((Path(ext.__file__).parent / "_ext.pyi").read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    assert names and not [n for n in sorted(names) if not hasattr(ext, n)]
