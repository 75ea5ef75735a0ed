#!/usr/bin/env bash
# Sets up qdiff in ./.venv on a fresh machine (Python >= 3.10), then runs the main job.
#   ./setup.sh            install + `qdiff run` on the built-in model (output in ./qdiff-out)
#   ./setup.sh --no-run   install only
# torch is installed first and pinned exactly (2.13.0): letting pip choose would pull a newer
# release with gigabytes of CUDA packages onto a CPU machine. On Linux a plain
# `pip install torch==2.13.0` from PyPI is still the CUDA build (~20 nvidia-* packages); a
# CPU-only machine gets the CPU build with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./setup.sh
# (left unset here by default: where the package registry is the only network, or a local wheel
# provides torch, the plain install is the one that works).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/qdiff run
fi
