#!/usr/bin/env bash
# The reduced CPU protocol behind docs/RESULTS.md, all-MiniLM-L6-v2 unless named, the same settings
# for every strategy: 6 rounds of a quarter epoch of local training (1.5 passes over the data),
# except where a cell says otherwise. In order:
#
#   1. MRPC, Dirichlet 0.5, 10 clients, seeds 0-2: E1, E2, E3 and both references;
#   2. aggregation error on real client updates, MRPC IID (E1 and E3 ranks, 3 rounds);
#   3. the QQP sample (all-MiniLM-L6-v2 learns it within this budget), 10 clients, 8 rounds of a
#      twentieth of an epoch (the sample holds 21,147 training pairs, so each client still takes
#      about 6 steps a round; 0.4 passes in all): Dirichlet 0.5, seed 0, E1, E3 and centralized;
#      IID, seed 0, hlora at ranks {2, 4, 8, 16};
#   4. the QQP sample, IID, longer local training: 3 rounds of 0.3 epoch (about 40 steps per
#      client and round; 0.9 passes in all), seed 0, E1 and E3 (hlora and zeropad);
#   5. SmolLM2-135M on MRPC, Dirichlet 0.5: aggregation error (1 round of a tenth of an epoch;
#      the backbone costs about 10 times MiniLM per token);
#   6. cell 4, E3 (hlora and zeropad) for seeds 1 and 2;
#   7. RTE, Dirichlet 0.5, seed 0: E1 and centralized;
#   8. MRPC, 100 clients with 20 sampled per round, ranks {2, 4, 8}, seed 0: 8 rounds of one local
#      epoch (each client holds about 37 pairs, so a quarter epoch would be a single step);
#   9. SmolLM2-135M on MRPC, seed 0, E1 for 2 rounds of a tenth of an epoch; cell 4, E1 for seeds
#      1 and 2;
#  10. cell 4, flora for seeds 0-2 (E3 complete on the cell where the federation learns), then
#      its references (centralized and local) for seed 0;
#  11. MRPC IID, seed 0, E1;
#  12. cell 4's settings on the Dirichlet 0.5 partition, seed 0: E1 and E3 (hlora, zeropad, flora),
#      the label-skewed cell at a local length where the IID federation learns;
#  13. the same for seed 2, E1 only: of the three seeds' partitions, seed 2's puts the fewest
#      examples on clients holding over 90 % of one class (12 %, against 62 % for seed 0);
#  14. cell 4's references (centralized and local) for seeds 1 and 2;
#  15. cell 4, E3 (hlora and zeropad) for seeds 3 and 4: the comparison where the strategies
#      separate, on 5 seeds;
#  16. cell 11 completed for seed 0 (MRPC IID): E3 and both references;
#  17. the QQP sample, IID, 100 clients with 20 sampled per round, ranks {2, 4, 8}: 6 rounds of
#      1.5 local epochs (each client holds about 211 pairs: about 20 steps a round; a round
#      trains on as many pairs as one of cell 4, and its average carries half the local steps),
#      E3: hlora and zeropad for seeds 0 and 1, flora for seed 0, then hlora and zeropad for
#      seed 2;
#  18. RTE IID, seed 0: E1 and centralized;
#  19. cell 4 run further, seed 0: 8 rounds instead of 3 (2.4 passes over the data), E3 (hlora,
#      zeropad), E1 (fedavg, hlora) and centralized: whether cell 4's gaps are still there when
#      the federation has trained longer (final accuracy, the paper's second claim);
#  20. MRPC IID, seeds 1 and 2: E1 and E3 (hlora and zeropad);
#  21. cell 19 for seed 1: E3 (hlora and zeropad);
#  22. cell 7 completed for seed 0 (RTE, Dirichlet 0.5): E3 and local;
#  23. cell 18 completed for seed 0 (RTE IID): E3 and local;
#  24. cell 8 (100 clients) for seeds 1 and 2;
#  25. RTE, both partitions, seeds 1 and 2: E1 and E3 (hlora and zeropad);
#  26. SmolLM2-135M on MRPC (cell 9's settings), seed 0: E3 (hlora and zeropad);
#  27. MRPC IID, seeds 1 and 2: flora and both references;
#  28. RTE, both partitions, seeds 1 and 2: flora and both references (`centralized` once per
#      seed: it pools the data, so the partition does not change it);
#  29. cell 12 for seeds 1 and 2: E3 (hlora and zeropad);
#  30. cell 19 for seed 2: E3 (hlora and zeropad);
#  31. cell 12 for seed 1: E1;
#  32. cell 12 for seeds 1 and 2: flora; then its `local` reference for seeds 0-2 (its
#      `centralized` one is cell 4's: the partition does not change it);
#  33. cell 9 (SmolLM2-135M) for seeds 1 and 2: E1 and E3 (hlora and zeropad);
#  34. cell 17 (the QQP sample, 100 clients) for seeds 1 and 2: flora;
#  35. cell 19 for seeds 1 and 2: E1.
#
#   bash experiments/cpu_protocol.sh [OUTPUT_DIR]      (default runs/cpu-protocol)
#
# A run that already has summary.json (a bias file that exists) is skipped, so the script can be
# restarted. About 22 hours on 2 CPU cores: cells 1 and 2 take about 105 minutes, a run of cell
# 17 about 20, one of cells 19, 21 and 30 about 18-22, cells 20-31 about 6.3 hours together (on
# one 2-core x86_64 machine; another of the same kind ran about 1.35 times faster, and took 1.75
# hours for cells 32-34). Never start a second torch process beside it on such a machine: two
# processes' threads on 2 cores run several times slower than one after the other.
set -euo pipefail
out="${1:-runs/cpu-protocol}"
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
# The recipe these cells ran with (before the run-wide schedule, the server optimizer and bf16 on
# CPUs): OLD_RECIPE keeps them reproducible; recipe_grid.sh runs the current recipe.
OLD_RECIPE=(--set train.lr_schedule=round --set server.optimizer=none --set train.precision=fp32
  --set server.eval_truncations=final)
RUN_ARGS=(--no-progress --data-dir "$data" --set federation.rounds=6 --set train.local_epochs=0.25
  "${OLD_RECIPE[@]}")
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
qqp=(--set data.task=qqp-sample --set federation.rounds=8 --set train.local_epochs=0.05)
GRID_REFS="centralized" grid "$out/qqp-dirichlet" "0" "${qqp[@]}"
GRID_REFS="" GRID_RUNS="e3-hlora" grid "$out/qqp-iid" "0" "${qqp[@]}" --set data.partition=iid
long=(--set data.task=qqp-sample --set data.partition=iid --set federation.rounds=3
      --set train.local_epochs=0.3)
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora e3-hlora e3-zeropad" grid "$out/qqp-iid-long" "0" \
  "${long[@]}"
bias e1-mrpc-smollm2 experiments/e1_mrpc.toml 1 --set model.name=smollm2-135m \
  --set train.local_epochs=0.1
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-iid-long" "1 2" "${long[@]}"
GRID_REFS="centralized" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/rte-dirichlet" "0" \
  --set data.task=rte
clients100 "$out/mrpc-100clients" "0" --set federation.rounds=8 --set train.local_epochs=1
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/smollm2-mrpc-dirichlet" "0" \
  --set model.name=smollm2-135m --set federation.rounds=2 --set train.local_epochs=0.1
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/qqp-iid-long" "1 2" "${long[@]}"
GRID_REFS="" GRID_RUNS="e3-flora" grid "$out/qqp-iid-long" "0 1 2" "${long[@]}"
GRID_RUNS="" grid "$out/qqp-iid-long" "0" "${long[@]}"
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/mrpc-iid" "0" --set data.partition=iid
GRID_REFS="" grid "$out/qqp-dirichlet-long" "0" "${long[@]}" --set data.partition=dirichlet
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/qqp-dirichlet-long" "2" "${long[@]}" \
  --set data.partition=dirichlet
GRID_RUNS="" grid "$out/qqp-iid-long" "1 2" "${long[@]}"
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-iid-long" "3 4" "${long[@]}"
GRID_RUNS="e3-hlora e3-zeropad e3-flora" grid "$out/mrpc-iid" "0" --set data.partition=iid
qqp100=(--set data.task=qqp-sample --set data.partition=iid --set federation.rounds=6
        --set train.local_epochs=1.5)
for job in hlora-s0 zeropad-s0 hlora-s1 zeropad-s1 flora-s0 hlora-s2 zeropad-s2; do
  run "$out/qqp-iid-100clients" "e3-$job" experiments/e3_mrpc_100clients.toml \
    --set federation.seed="${job#*-s}" --set federation.strategy="${job%-s*}" "${qqp100[@]}"
done
GRID_REFS="centralized" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/rte-iid" "0" --set data.task=rte \
  --set data.partition=iid
long8=("${long[@]}" --set federation.rounds=8)  # cell 4, later --set wins
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-iid-8rounds" "0" "${long8[@]}"
GRID_REFS="centralized" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/qqp-iid-8rounds" "0" \
  "${long8[@]}"
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora e3-hlora e3-zeropad" grid "$out/mrpc-iid" "1 2" \
  --set data.partition=iid
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-iid-8rounds" "1" "${long8[@]}"
GRID_REFS="local" GRID_RUNS="e3-hlora e3-zeropad e3-flora" grid "$out/rte-dirichlet" "0" \
  --set data.task=rte
GRID_REFS="local" GRID_RUNS="e3-hlora e3-zeropad e3-flora" grid "$out/rte-iid" "0" \
  --set data.task=rte --set data.partition=iid
clients100 "$out/mrpc-100clients" "1 2" --set federation.rounds=8 --set train.local_epochs=1
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora e3-hlora e3-zeropad" grid "$out/rte-dirichlet" "1 2" \
  --set data.task=rte
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora e3-hlora e3-zeropad" grid "$out/rte-iid" "1 2" \
  --set data.task=rte --set data.partition=iid
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/smollm2-mrpc-dirichlet" "0" \
  --set model.name=smollm2-135m --set federation.rounds=2 --set train.local_epochs=0.1
GRID_RUNS="e3-flora" grid "$out/mrpc-iid" "1 2" --set data.partition=iid
GRID_RUNS="e3-flora" grid "$out/rte-iid" "1 2" --set data.task=rte --set data.partition=iid
GRID_REFS="local" GRID_RUNS="e3-flora" grid "$out/rte-dirichlet" "1 2" --set data.task=rte
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-dirichlet-long" "1 2" "${long[@]}" \
  --set data.partition=dirichlet
GRID_REFS="" GRID_RUNS="e3-hlora e3-zeropad" grid "$out/qqp-iid-8rounds" "2" "${long8[@]}"
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/qqp-dirichlet-long" "1" "${long[@]}" \
  --set data.partition=dirichlet
GRID_REFS="local" GRID_RUNS="e3-flora" grid "$out/qqp-dirichlet-long" "1 2" "${long[@]}" \
  --set data.partition=dirichlet
GRID_REFS="local" GRID_RUNS="" grid "$out/qqp-dirichlet-long" "0" "${long[@]}" \
  --set data.partition=dirichlet
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora e3-hlora e3-zeropad" grid \
  "$out/smollm2-mrpc-dirichlet" "1 2" --set model.name=smollm2-135m --set federation.rounds=2 \
  --set train.local_epochs=0.1
for seed in 1 2; do
  run "$out/qqp-iid-100clients" "e3-flora-s$seed" experiments/e3_mrpc_100clients.toml \
    --set federation.seed="$seed" --set federation.strategy=flora "${qqp100[@]}"
done
GRID_REFS="" GRID_RUNS="e1-fedavg e1-hlora" grid "$out/qqp-iid-8rounds" "1 2" "${long8[@]}"
