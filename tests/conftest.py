"""Fixtures for the simulator tests (the builders live in simkit.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[True, False], ids=["ff", "noff"])
def ff(request) -> bool:
    """Run a simulation test with SimConfig.fast_forward on and off."""
    return request.param
