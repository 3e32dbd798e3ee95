#!/usr/bin/env bash
# The README's main job: set up .venv, then give the embedded model a new identity and show
# its answers before and after.  Usage: bash scripts/demo.sh [--name NAME --author AUTHOR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source "${KEEL_VENV:-.venv}/bin/activate"
start=$(date +%s)
keel recipe identity --name "${KEEL_DEMO_NAME:-Keel Robot}" --author "${KEEL_DEMO_AUTHOR:-Keel Lab}" "$@"
echo "demo: wall $(( $(date +%s) - start ))s"
