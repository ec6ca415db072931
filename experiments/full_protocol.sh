#!/usr/bin/env bash
# The whole experiment grid of docs/RESULTS.md at full length (20 rounds of half an epoch; 50
# rounds with 100 clients), for a GPU machine: E1, E2 and E3 on MRPC, RTE and the local QQP
# sample (qqp-sample, its own 10 % dev split: not comparable with GLUE's QQP dev), Dirichlet 0.5 and
# IID, seeds 0-2, all-MiniLM-L6-v2; E3 with 100 clients (20 per round, ranks up to 8); E1 and E3
# on MRPC with SmolLM2-135M. Every strategy gets the same settings.
#
#   [JOBS=N] [MODEL_LABEL=L] bash experiments/full_protocol.sh [OUTPUT_DIR] [MODEL]
#                                               (default runs/full-protocol, minilm, JOBS=1)
#
# MODEL=roberta-large runs the paper's backbone (needs the Hugging Face hub); MODEL may also be a
# local model folder, then MODEL_LABEL names its folder under OUTPUT_DIR (default: MODEL). A run
# folder that already has summary.json is skipped, so the script can be restarted after an
# interruption. JOBS=N runs N runs at a time, in the order below (cells in priority order, seed 0
# of a cell before seed 1), each one's output in OUTPUT_DIR/.../NAME.log: a small backbone leaves
# most of a GPU idle, so several runs share one (set OMP_NUM_THREADS to cores / N).
# Tables: python experiments/results.py OUTPUT_DIR/<model>/<task>-<partition> --cell NAME \
#   --plots FOLDER
set -euo pipefail
out="${1:-runs/full-protocol}"
model="${2:-minilm}"
label="${MODEL_LABEL:-$model}"
jobs="${JOBS:-1}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
# The recipe of docs/RESULTS.md section 2 (before the run-wide schedule and the server optimizer;
# on a GPU bf16 autocast was already the rule).
RUN_ARGS=(--no-progress --data-dir "$data" --set train.lr_schedule=round --set server.optimizer=none
  --set server.eval_truncations=final --set train.local_epochs=0.5)
LOCAL_ARGS=()
if ((jobs > 1)); then
  GRID_PLAN="$(mktemp)"
  trap 'rm -f "$GRID_PLAN"' EXIT
fi

for task in mrpc rte; do
  grid "$out/$label/$task-dirichlet" "0 1 2" --set model.name="$model" --set data.task=$task
  grid "$out/$label/$task-iid" "0 1 2" --set model.name="$model" --set data.task=$task \
    --set data.partition=iid
done
clients100 "$out/$label/mrpc-100clients" "0 1 2" --set model.name="$model"
grid "$out/$label/qqp-sample-dirichlet" "0 1 2" --set model.name="$model" --set data.task=qqp-sample
grid "$out/$label/qqp-sample-iid" "0 1 2" --set model.name="$model" --set data.task=qqp-sample \
  --set data.partition=iid
if [[ "$label" == "minilm" ]]; then
  GRID_REFS="" grid "$out/smollm2-135m/mrpc-dirichlet" "0 1 2" --set model.name=smollm2-135m
fi
if ((jobs > 1)); then
  run_plan "$GRID_PLAN" "$jobs"
fi
