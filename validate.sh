#!/usr/bin/env bash
# Evaluate a trained model: masks, plots and metrics (sets up .venv on first use). With no settings: the experiment
# trained last in logs/ on the sample's val split. Settings are environment variables; further arguments go to
# validate.py as they are:
#   CHECK_DIR=logs/flood DATASET=my_data/val TTA=d4 bash validate.sh --raw
set -euo pipefail
source "$(dirname "$0")/setup.sh" requirements.txt   # paths are taken from the folder it is run in

LOG_DIR=${LOG_DIR:-logs}
# With neither CHECKPOINT nor CHECK_DIR: the experiment trained last, by the time of its last.pth (only training
# writes last.pth; validating writes beside best.pth and may rewrite it, so folder and best.pth times mislead).
if [ -z "${CHECKPOINT:-}" ] && [ -z "${CHECK_DIR:-}" ]; then
  CHECK_DIR=$(ls -t "$LOG_DIR"/*/last.pth 2>/dev/null | while read -r f; do d=$(dirname "$f"); [ -f "$d/best.pth" ] && echo "$d" && break; done || true)
  if [ -z "$CHECK_DIR" ]; then
    echo "error: no experiment with a best.pth in $LOG_DIR/: run bash train.sh first, or set CHECK_DIR" >&2
    exit 2
  fi
fi
args=(-d "${DATASET:-$kit/data/sample/val}")
if [ -n "${CHECKPOINT:-}" ]; then args+=(-c "$CHECKPOINT"); else args+=(-cd "$CHECK_DIR"); fi
add() { [ -n "${2:-}" ] && args+=("$1" "$2"); return 0; }
add -o "${OUTPUT:-}"
add -t "${THRES:-}"
add --tile-size "${TILE_SIZE:-}"
add --tta "${TTA:-}"
add -b "${BATCH:-}"
read -r -a outputs <<< "${OUTPUTS:---binary --plots}"   # which files to write, e.g. OUTPUTS="--binary --raw"
exec "$PY" "$kit/validate.py" "${args[@]}" "${outputs[@]}" "$@"
