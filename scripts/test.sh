#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests on the embedded model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source "${KEEL_VENV:-.venv}/bin/activate"
python -m pytest -q -p no:cacheprovider "$@"
