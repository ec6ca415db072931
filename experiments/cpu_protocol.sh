#!/usr/bin/env bash
# The reduced CPU protocol behind docs/RESULTS.md: E1, E2 and E3 on MRPC (Dirichlet 0.5,
# 10 clients, all taking part), all-MiniLM-L6-v2, seeds 0-2, 6 rounds of a quarter epoch each.
# The same settings for every strategy; only the references' evaluation is thinned ("local"
# evaluates each of its 10 client models, so it is evaluated every 3 rounds).
#
#   bash experiments/cpu_protocol.sh [OUTPUT_DIR]      (default runs/cpu-protocol)
#
# A run folder that already has summary.json is skipped, so the script can be restarted.
set -euo pipefail
out="${1:-runs/cpu-protocol}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"
common=(--no-progress --data-dir "$data" --output "$out"
        --set federation.rounds=6 --set train.local_epochs=0.25)

run() {  # name, config, extra --set arguments...
  local name="$1" config="$2"; shift 2
  if [[ -f "$out/$name/summary.json" ]]; then echo "skip $name"; return; fi
  rm -rf "${out:?}/$name"
  echo "$(date -u +%H:%M:%S) start $name"
  hlora run "$config" "${common[@]}" --set output.name="$name" "$@"
}

for seed in 0 1 2; do
  s=(--set federation.seed=$seed)
  run "e3-hlora-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=hlora
  run "e1-fedavg-s$seed"      experiments/e1_mrpc.toml "${s[@]}" --set federation.strategy=fedavg
  run "e1-hlora-s$seed"       experiments/e1_mrpc.toml "${s[@]}" --set federation.strategy=hlora
  run "e3-zeropad-s$seed"     experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=zeropad
  run "e3-flora-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=flora
  run "e3-centralized-s$seed" experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=centralized
  run "e3-local-s$seed"       experiments/e3_mrpc.toml "${s[@]}" --set federation.strategy=local \
    --set server.eval_every=3
done
