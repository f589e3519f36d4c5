#!/bin/sh
# Create the virtual environment and install stm-live with its test tools.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Without an NVIDIA GPU take the pinned CPU build of PyTorch first (on this project's machines it
# installs from local disk in seconds); with a GPU the range in pyproject.toml brings CUDA builds.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
