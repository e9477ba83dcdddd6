#!/usr/bin/env bash
# Screenshots of the operator GUI on the simulator, for docs/screenshots/.
# Starts the app under Xvfb, walks through the wafer workflow (overview,
# sections, grids, order, acquisition, pause, autofocus) and saves PNGs.
#   bash scripts/screenshots.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/screenshots}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
xvfb-run -a -s "-screen 0 1680x1050x24" \
    "$PY" -m gui.app --config configs/sim.yaml --screenshot-tour "$OUT"
ls -l "$OUT"/*.png
