#!/bin/sh
# Create the virtual environment and install stm-live with its test tools.
# PyTorch (when a later model needs it) is installed as the CPU build unless a GPU is present.
set -eu
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
