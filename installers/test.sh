#!/usr/bin/env bash
# Set up the project's virtual environment (.venv) on a fresh machine and run the test suite.
# Extra arguments go to pytest (e.g. installers/test.sh -k vae).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment in .venv"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Tests run on the CPU: any torch already in .venv is kept; otherwise 2.13.0 (the tested lower bound).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "installing torch 2.13.0"
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
exec .venv/bin/python -m pytest "$@"
