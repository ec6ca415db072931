#!/usr/bin/env bash
# The reduced CPU protocol behind docs/RESULTS.md, all-MiniLM-L6-v2 unless named, the same settings
# for every strategy: every round is a quarter epoch of local training and there are 6 rounds
# (1.5 passes over the data), except where a cell says otherwise.
#
#   1. MRPC, Dirichlet 0.5, 10 clients, seeds 0-2: E1, E2, E3 and both references;
#   2. aggregation error on real client updates, MRPC IID (E1 and E3 ranks, 3 rounds);
#   3. MRPC IID, seed 0: E1, E3 and the local reference (centralized ignores the partition);
#   4. RTE, Dirichlet 0.5, seed 0: E1, E3 and both references;
#   5. MRPC, 100 clients with 20 sampled per round, ranks {2, 4, 8}, seed 0: 8 rounds of one local
#      epoch (each client holds about 37 pairs, so a quarter epoch would be a single step);
#   6. SmolLM2-135M on MRPC, Dirichlet 0.5, seed 0: aggregation error (1 round) and E1, 2 rounds
#      of a tenth of an epoch (the backbone is about 10 times MiniLM's cost per token);
#   7. RTE IID, seed 0: E1, E3 and the local reference.
#
#   bash experiments/cpu_protocol.sh [OUTPUT_DIR]      (default runs/cpu-protocol)
#
# A run that already has summary.json (a bias file that exists) is skipped, so the script can be
# restarted. The whole script takes about 4 hours on 2 CPU cores; cells 1 and 2 about 105 minutes.
set -euo pipefail
out="${1:-runs/cpu-protocol}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
RUN_ARGS=(--no-progress --data-dir "$data" --set federation.rounds=6 --set train.local_epochs=0.25)
LOCAL_ARGS=(--set server.eval_every=3)

# bias NAME CONFIG ROUNDS [--set ...]: aggregation_bias.py's rows, kept as OUT/bias/NAME.json.
bias() {
  local name="$1" config="$2" rounds="$3"; shift 3
  local file="$out/bias/$name.json"
  if [[ -f "$file" ]]; then echo "skip $file"; return; fi
  mkdir -p "$out/bias"
  echo "$(date -u +%H:%M:%S) start $file"
  python "$(dirname "$0")/aggregation_bias.py" "$config" --rounds "$rounds" --data-dir "$data" \
    "$@" | tail -n 1 > "$file.tmp"
  mv "$file.tmp" "$file"
}

grid "$out/mrpc-dirichlet" "0 1 2"
bias e1-mrpc-iid experiments/e1_mrpc.toml 3 --set data.partition=iid
bias e3-mrpc-iid experiments/e3_mrpc.toml 3 --set data.partition=iid
GRID_REFS="local" grid "$out/mrpc-iid" "0" --set data.partition=iid
grid "$out/rte-dirichlet" "0" --set data.task=rte
clients100 "$out/mrpc-100clients" "0" --set federation.rounds=8 --set train.local_epochs=1
bias e1-mrpc-smollm2 experiments/e1_mrpc.toml 1 --set model.name=smollm2-135m \
  --set train.local_epochs=0.1
for strategy in fedavg hlora; do
  run "$out/smollm2-mrpc-dirichlet" "e1-$strategy-s0" experiments/e1_mrpc.toml \
    --set federation.strategy=$strategy --set model.name=smollm2-135m \
    --set federation.rounds=2 --set train.local_epochs=0.1
done
GRID_REFS="local" grid "$out/rte-iid" "0" --set data.task=rte --set data.partition=iid
