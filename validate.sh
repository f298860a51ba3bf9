#!/usr/bin/env bash
# Evaluate a trained model: masks, plots and metrics (sets up .venv on first use). With no settings: the newest
# experiment in logs/ on the sample's val split. Settings are environment variables; further arguments go to
# validate.py as they are:
#   CHECK_DIR=logs/flood DATASET=my_data/val TTA=d4 bash validate.sh --raw
set -euo pipefail
cd "$(dirname "$0")"
source setup.sh requirements.txt

LOG_DIR=${LOG_DIR:-logs}
if [ -z "${CHECKPOINT:-}" ] && [ -z "${CHECK_DIR:-}" ]; then   # the newest experiment that has a best.pth
  CHECK_DIR=$(ls -td "$LOG_DIR"/*/ 2>/dev/null | while read -r d; do [ -f "$d/best.pth" ] && echo "${d%/}" && break; done)
  if [ -z "$CHECK_DIR" ]; then
    echo "error: no experiment with a best.pth in $LOG_DIR/: run bash train.sh first, or set CHECK_DIR" >&2
    exit 2
  fi
fi
args=(-d "${DATASET:-data/sample/val}")
if [ -n "${CHECKPOINT:-}" ]; then args+=(-c "$CHECKPOINT"); else args+=(-cd "$CHECK_DIR"); fi
add() { [ -n "${2:-}" ] && args+=("$1" "$2"); return 0; }
add -o "${OUTPUT:-}"
add -t "${THRES:-}"
add --tile-size "${TILE_SIZE:-}"
add --tta "${TTA:-}"
add -b "${BATCH:-}"
read -r -a outputs <<< "${OUTPUTS:---binary --plots}"   # which files to write, e.g. OUTPUTS="--binary --raw"
exec "$PY" validate.py "${args[@]}" "${outputs[@]}" "$@"
