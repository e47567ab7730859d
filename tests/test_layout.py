"""Imports run one way: nothing in simulator/ imports replay, calibrate or validation."""

from __future__ import annotations

import ast

import pytest

from simkit import REPO

SIM_FILES = sorted((REPO / "simulator").rglob("*.py"))


def _imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", SIM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_simulator_does_not_import_upward(path):
    """A simulator module imports neither replay, calibrate nor validation."""
    assert not _imported_roots(path) & {"replay", "calibrate", "validation"}


def test_layout_check_sees_the_simulator():
    """The import check really scans the simulator package (it would catch an upward import)."""
    assert len(SIM_FILES) > 10
    assert "numpy" in _imported_roots(REPO / "simulator" / "metrics.py")
