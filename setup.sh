#!/usr/bin/env bash
# Sets up qdiff in ./.venv on a fresh machine (Python >= 3.10), then runs the main job.
#   ./setup.sh            install + `qdiff run` on the built-in model (output in ./qdiff-out)
#   ./setup.sh --no-run   install only
# torch is installed first and pinned exactly (2.13.0): letting pip choose would pull a newer
# release with gigabytes of CUDA packages onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/qdiff run
fi
