#!/usr/bin/env bash
# Train a model: sets up .venv on first use, then runs train.py. With no settings it trains on the bundled sample
# (data/sample: RGB + NIR water tiles, 30 epochs) in a couple of minutes on a CPU. The experiment is named after the
# dataset folder (logs/sample), so running it again resumes it, or says it is finished; EXP_NAME names another.
# Every setting is an environment variable (unset: train.py's default); further arguments go to train.py as they are:
#   DATASET=my_data ADD_DIRS="nir" CLASS_LIST="1 2 5" CLASS_NAMES="road, building, tree" EPOCHS=100 bash train.sh
# Paths are taken from the folder it is run in, as train.py takes them; the sample is found beside the script.
set -euo pipefail
source "$(dirname "$0")/setup.sh" requirements.txt

DATASET=${DATASET:-$kit/data/sample}
if [ "$(cd "$DATASET" 2>/dev/null && pwd)" = "$kit/data/sample" ]; then ADD_DIRS=${ADD_DIRS-nir}; EPOCHS=${EPOCHS:-30}; fi
args=(-d "$DATASET")
add() { [ -n "${2:-}" ] && args+=("$1" "$2"); return 0; }
add -m "${MODEL:-}"
add --encoder "${ENCODER:-}"
add -e "${EPOCHS:-}"
add -b "${BATCH:-}"
add --image-size "${IMAGE_SIZE:-}"
add --add-dirs "${ADD_DIRS:-}"
add --class-list "${CLASS_LIST:-}"
add --class-names "${CLASS_NAMES:-}"
add -a "${AUG:-}"
add -log "${LOG_DIR:-}"
data_name=$(basename "$(cd "$DATASET" 2>/dev/null && pwd || echo "$DATASET")")
add --exp-name "${EXP_NAME:-$data_name}"   # an existing experiment resumes
exec "$PY" "$kit/train.py" "${args[@]}" "$@"
