#!/usr/bin/env bash
# Set up .venv with the test tools and run the checks CI runs: lint, then the test suite (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")"
source setup.sh requirements-dev.txt
"$PY" -m ruff check .
HF_HUB_OFFLINE=1 "$PY" -m pytest -q "$@"
