#!/usr/bin/env bash
# The paper's comparisons with the current recipe (the defaults of `hlora run`: the main job's
# length, run-wide schedule, server optimizer, logit adjustment), evaluated on dev: per cell and
# seed, E1 (fedavg and hlora, every client at rank 8), E3 (hlora, zeropad, flora at ranks
# {2, 4, 8, 16}) and the centralized reference (same passes over the data, one client, rank 16).
#
#   bash experiments/recipe_grid.sh [OUT] [CELL ...]
#
# CELL: mrpc-dirichlet (default), mrpc-iid, qqp-dirichlet, qqp-iid (the local QQP sample).
# SEEDS (default "0 1 2") and JOBS (default 2: runs at a time, one CPU thread each) come from
# the environment. Finished runs (summary.json) are skipped: the script can be restarted.
# Tables: python experiments/results.py OUT/CELL --cell CELL --target 0.78
set -euo pipefail
out="${1:-runs/recipe-grid}"
shift || true
cells=("${@:-mrpc-dirichlet}")
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
# The experiment files fix 20 rounds; the recipe's own length is the default's.
rounds="$(python -c 'from hlora.config import load_config; print(load_config().federation.rounds)')"
RUN_ARGS=(--no-progress --data-dir "$data" --set federation.rounds="$rounds")
export OMP_NUM_THREADS=1
plan="$(mktemp)"
for cell in "${cells[@]}"; do
  case "$cell" in
    mrpc-dirichlet) args=() ;;
    mrpc-iid) args=(--set data.partition=iid) ;;
    qqp-dirichlet) args=(--set data.task=qqp-sample) ;;
    qqp-iid) args=(--set data.task=qqp-sample --set data.partition=iid) ;;
    *) echo "unknown cell $cell" >&2; exit 2 ;;
  esac
  for seed in ${SEEDS:-0 1 2}; do
    GRID_PLAN="$plan" GRID_REFS="centralized" grid "$out/$cell" "$seed" "${args[@]}"
  done
done
run_plan "$plan" "${JOBS:-2}"
rm -f "$plan"
