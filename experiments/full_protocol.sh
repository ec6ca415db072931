#!/usr/bin/env bash
# The whole experiment grid of docs/RESULTS.md at full length (20 rounds of half an epoch; 50
# rounds with 100 clients), for a GPU machine: E1, E2 and E3 on MRPC, RTE and the local QQP
# sample (qqp-sample, its own 10 % dev split: not comparable with GLUE's QQP dev), Dirichlet 0.5 and
# IID, seeds 0-2, all-MiniLM-L6-v2; E3 with 100 clients (20 per round, ranks up to 8); E1 and E3
# on MRPC with SmolLM2-135M. Every strategy gets the same settings.
#
#   bash experiments/full_protocol.sh [OUTPUT_DIR] [MODEL]     (default runs/full-protocol, minilm)
#
# MODEL=roberta-large runs the paper's backbone (needs the Hugging Face hub). A run folder that
# already has summary.json is skipped, so the script can be restarted after an interruption.
# Tables: python experiments/results.py OUTPUT_DIR/<model>/<task>-<partition> --cell NAME \
#   --plots FOLDER
set -euo pipefail
out="${1:-runs/full-protocol}"
model="${2:-minilm}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
RUN_ARGS=(--no-progress --data-dir "$data")
LOCAL_ARGS=()

for task in mrpc rte qqp-sample; do
  grid "$out/$model/$task-dirichlet" "0 1 2" --set model.name="$model" --set data.task=$task
  grid "$out/$model/$task-iid" "0 1 2" --set model.name="$model" --set data.task=$task \
    --set data.partition=iid
done
clients100 "$out/$model/mrpc-100clients" "0 1 2" --set model.name="$model"
if [[ "$model" == "minilm" ]]; then
  GRID_REFS="" grid "$out/smollm2-135m/mrpc-dirichlet" "0 1 2" --set model.name=smollm2-135m
fi
