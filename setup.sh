#!/usr/bin/env bash
# Make .venv (once) and install a requirements file into it (again only when a requirements file changes).
#   source setup.sh [requirements.txt]      -> sets PY to the venv's python
# VENV=none uses the current python3 as it is (e.g. Google Colab, where torch is preinstalled).
set -euo pipefail
kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # requirements and .venv live beside the scripts
req=$kit/${1:-requirements.txt}
PY=${PYTHON:-python3}
venv=${VENV:-$kit/.venv}
# The Python that runs segkit (the one that makes the venv, or the current one with VENV=none) must be 3.10+.
if { [ "$venv" = none ] || [ ! -x "$venv/bin/python" ]; } \
    && ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  have=$("$PY" -c 'import sys; print("Python " + sys.version.split()[0])' 2>/dev/null || echo "not found")
  echo "error: segkit needs Python 3.10 or newer ($PY: $have); install one and name it, e.g." \
       "PYTHON=python3.11 bash train.sh" >&2
  exit 2
fi
if [ "$venv" != none ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "setting up $venv (first run only: PyTorch is a large download, a few minutes) ..."
    "$PY" -m venv "$venv"
  fi
  PY="$venv/bin/python"
  stamp="$venv/.installed-$(basename "$req")"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$(cat "$kit"/requirements*.txt)" ]; then
    echo "installing $req into $venv (the first time this includes PyTorch: about 6 GB on Linux) ..."
    quiet=-q; [ -t 1 ] && quiet=   # pip's progress bars on a terminal, not in logs
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install $quiet -r "$req"
    cat "$kit"/requirements*.txt > "$stamp"
  fi
fi
