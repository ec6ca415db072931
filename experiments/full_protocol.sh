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
# Tables: python experiments/results.py OUTPUT_DIR/<task>-<partition> --plots FOLDER
set -euo pipefail
out="${1:-runs/full-protocol}"
model="${2:-minilm}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"

run() {  # folder, name, config, extra --set arguments...
  local folder="$1" name="$2" config="$3"; shift 3
  if [[ -f "$folder/$name/summary.json" ]]; then echo "skip $folder/$name"; return; fi
  rm -rf "${folder:?}/$name"
  echo "$(date -u +%H:%M:%S) start $folder/$name"
  hlora run "$config" --no-progress --data-dir "$data" --output "$folder" \
    --set output.name="$name" --set model.name="$model" "$@"
}

grid() {  # folder, extra --set arguments for every run...
  local folder="$1"; shift
  for seed in 0 1 2; do
    local s=(--set federation.seed=$seed "$@")
    run "$folder" "e3-hlora-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=hlora
    run "$folder" "e1-fedavg-s$seed"      experiments/e1_mrpc.toml "${s[@]}" --set federation.strategy=fedavg
    run "$folder" "e1-hlora-s$seed"       experiments/e1_mrpc.toml "${s[@]}" --set federation.strategy=hlora
    run "$folder" "e3-zeropad-s$seed"     experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=zeropad
    run "$folder" "e3-flora-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=flora
    run "$folder" "e3-centralized-s$seed" experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=centralized
    run "$folder" "e3-local-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=local
  done
}

for task in mrpc rte qqp-sample; do
  grid "$out/$model/$task-dirichlet" --set data.task=$task
  grid "$out/$model/$task-iid" --set data.task=$task --set data.partition=iid
done

# 100 clients, 20 sampled per round, ranks {2, 4, 8} (the paper authors' setting).
for seed in 0 1 2; do
  for strategy in hlora zeropad flora; do
    run "$out/$model/mrpc-100clients" "e3-$strategy-s$seed" experiments/e3_mrpc_100clients.toml \
      --set federation.seed=$seed --set federation.strategy=$strategy
  done
done

# A decoder backbone on MRPC.
if [[ "$model" == "minilm" ]]; then
  for seed in 0 1 2; do
    for strategy in hlora fedavg; do
      run "$out/smollm2-135m/mrpc-dirichlet" "e1-$strategy-s$seed" experiments/e1_mrpc.toml \
        --set federation.seed=$seed --set federation.strategy=$strategy --set model.name=smollm2-135m
    done
    for strategy in hlora zeropad flora; do
      run "$out/smollm2-135m/mrpc-dirichlet" "e3-$strategy-s$seed" experiments/e3_mrpc.toml \
        --set federation.seed=$seed --set federation.strategy=$strategy --set model.name=smollm2-135m
    done
  done
fi
