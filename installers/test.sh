#!/usr/bin/env bash
# Set up the project's virtual environment (.venv) on a fresh machine and run the test suite (CPU only).
# Extra arguments go to pytest (e.g. installers/test.sh -k vae). This is the README's test command and CI's entry
# (.ci/run); installers/test.bat does the same on Windows.
#
# The venv is created or repaired by installers/setup_env.py, as run.sh does. A torch already in .venv is kept
# (CPU or CUDA build); otherwise torch 2.13.0, the tested lower bound, comes from pip's configured index.
# WAN_LOCAL_TORCH_SPEC / WAN_LOCAL_TORCH_INDEX_URL replace that requirement / index; PYTHON or WAN_LOCAL_PYTHON
# picks the Python that creates .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${WAN_LOCAL_PYTHON:-${PYTHON:-python3}}
"$PYTHON" installers/setup_env.py ensure-venv
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
    spec=${WAN_LOCAL_TORCH_SPEC:-torch==2.13.0}
    index=${WAN_LOCAL_TORCH_INDEX_URL:-default}
    echo "installing $spec"
    if [ "$index" = default ]; then
        "$VPY" -m pip install --quiet "$spec"
    else
        "$VPY" -m pip install --quiet --index-url "$index" "$spec"
    fi
fi
"$VPY" -m pip install --quiet -e ".[test]"
exec "$VPY" -m pytest "$@"
