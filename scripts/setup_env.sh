#!/usr/bin/env bash
# Creates the virtual environment with pinned dependencies.
# torch is installed first as the CPU build so nothing pulls the CUDA stack.
set -euo pipefail
PYTHON=${1:-python3.11}
VENV=${2:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)

bash "$here/scripts/system_deps.sh"

command -v "$PYTHON" >/dev/null || { echo "need $PYTHON on PATH" >&2; exit 1; }
"$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --disable-pip-version-check "torch==2.13.0+cpu" 2>/dev/null \
  || $pip install -q --disable-pip-version-check "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
$pip install -q --disable-pip-version-check -r "$here/requirements.lock"
# the project itself, editable: importable without sys.path edits (pyproject.toml)
$pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$here"
