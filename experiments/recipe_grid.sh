#!/usr/bin/env bash
# The paper's comparisons and the recipe's ablation with the current recipe (the defaults of
# `hlora run`: the main job's length, run-wide linear schedule, logit adjustment), on dev.
#
#   bash experiments/recipe_grid.sh [OUT] [CELL ...]
#
# CELL (default: mrpc-dirichlet ablation):
#   mrpc-dirichlet, mrpc-iid, mrpc-iid-sgd2 (server SGD, eta 2), qqp-dirichlet, qqp-iid,
#     qqp-iid-sgd2 (the local QQP sample), rte-dirichlet, rte-iid, rte-iid-sgd2: per seed, E3
#     (hlora, zeropad, flora at ranks {2, 4, 8, 16}), the centralized reference (one client with
#     all the data, rank 16, the same passes) and E1 (fedavg and hlora, every client at rank 8);
#     the QQP sample's cells train 4 passes (16 rounds of a quarter epoch), its reference at
#     learning rate 1e-3 and its Dirichlet cell's federations at 4e-3 (chosen on its validation
#     split: recipe_search.sh qqp, qqp2); MRPC's
#     reference trains at learning rate 5e-4 (recipe_search.sh central), RTE's at the recipe's;
#   sft-mrpc-dirichlet: the same runs for instruction tuning, each one the demo
#     (examples/smollm2_mrpc_instruct.toml: SmolLM2-135M, MRPC as instructions, 10 clients, 3 a
#     round, Dirichlet 0.5) with its strategy and ranks; `centralized` trains the drawn clients'
#     share of the local epochs each round (0.3 of an epoch for the demo), and `local` is
#     evaluated after the last round only (each evaluation scores ten models);
#   mrpc-dirichlet-fedsgd, mrpc-iid-fedsgd: one SGD step per client and round with Adam on the
#     server (FedSGD + FedAdam), at the passes of the plain cells (run with REFS=""); the clients'
#     steps unclipped since 2026-12-05 (GRID_SET="train.max_grad_norm=1" gives the runs before);
#     mrpc-dirichlet-fedsgd-bs4, mrpc-iid-fedsgd-bs4: the same at four times the depth (clients'
#     batches of 4); qqp-dirichlet-fedsgd, qqp-iid-fedsgd: the same on the QQP sample at its 4
#     passes (references: the plain qqp cells');
#   ablation: MRPC, Dirichlet 0.5, seed 0, hlora at {2, 4, 8, 16} with one option changed at a
#     time (the old recipe; no logit adjustment; the per-round schedule; FedProx; FedAvgM).
# SEEDS (default "0 1 2") and JOBS (default 2: runs at a time, one CPU thread each) come from the
# environment; so may the runs of a seed: HLORA_RUNS (default "e3-hlora"), REFS (default
# "centralized"), then REST_RUNS (default "e3-zeropad e1-fedavg e1-hlora e3-flora"). Runs are
# planned seed by seed, so the first seeds finish first. Finished runs (summary.json) are
# skipped: the script can be restarted (with GRID_RESUME=1 an unfinished run continues from its
# last round rather than from nothing: experiments/grid.sh). GRID_SET (space-separated
# KEY=VALUE) adds overrides to every run, for example GRID_SET="model.name=FOLDER" where the
# offline model package is missing.
# Tables: python experiments/results.py OUT/CELL --cell CELL --target 0.78
set -euo pipefail
out="${1:-runs/recipe-grid}"
shift || true
cells=("${@:-mrpc-dirichlet}")
[[ $# -eq 0 ]] && cells=(mrpc-dirichlet ablation)
data="${HLORA_DATA_DIR:-../shared/data/glue}"
source "$(dirname "$0")/grid.sh"
# The experiment files fix 20 rounds; the recipe's own length is the default's.
rounds="$(python -c 'from hlora.config import load_config; print(load_config().federation.rounds)')"
RUN_ARGS=(--no-progress --data-dir "$data" --set federation.rounds="$rounds")
for override in ${GRID_SET:-}; do RUN_ARGS+=(--set "$override"); done
export OMP_NUM_THREADS=1
plan="$(mktemp)"
export GRID_PLAN="$plan"
demo=examples/smollm2_mrpc_instruct.toml
for cell in "${cells[@]}"; do
  config=""
  LOCAL_ARGS=()
  case "$cell" in
    sft-mrpc-dirichlet)
      config="$demo"
      read -r demo_rounds central_epochs < <(python -c "from hlora.config import load_config
c = load_config('$demo'); f = c.federation
print(f.rounds, c.train.local_epochs * f.clients_per_round / f.num_clients)")
      args=(--set federation.rounds="$demo_rounds")
      # the passes of the drawn clients' local epochs
      CENTRAL_ARGS=(--set train.local_epochs="$central_epochs")
      LOCAL_ARGS=(--set server.eval_every="$demo_rounds") ;;
    mrpc-dirichlet-fedsgd | mrpc-iid-fedsgd | mrpc-dirichlet-fedsgd-bs4 | mrpc-iid-fedsgd-bs4 \
      | qqp-dirichlet-fedsgd | qqp-iid-fedsgd)
      # One plain SGD step per client and round, Adam on the server (examples/mrpc_fedsgd.toml,
      # chosen by recipe_search.sh fedsgd) at its rounds (the plain cells' 16 passes), each
      # experiment's strategy and ranks. The references are the plain cells' (they have no
      # rounds to change): run these cells with REFS="".
      if [[ -n "${REFS-centralized}" ]]; then
        echo "$cell: the references are the plain cell's; run it with REFS=\"\"" >&2; exit 2
      fi
      config=examples/mrpc_fedsgd.toml
      read -r fedsgd_rounds every < <(python -c "from hlora.config import load_config
c = load_config('$config'); print(c.federation.rounds, c.server.eval_every)")
      case "$cell" in
        # The QQP sample at the plain qqp cells' 4 passes: 529 rounds of ten batches of 16 over
        # its 21,147 training pairs, evaluated once a pass, Adam on the server at the rate
        # chosen for fedavg on its validation split (recipe_search.sh qqp-fedsgd).
        qqp-*) args=(--set data.task=qqp-sample --set federation.rounds=529
          --set server.eval_every=133 --set server.learning_rate=2e-3) ;;
        # Four times the depth (recipe_search.sh fedsgd-depth): the clients' batches of 4, four
        # times the rounds (and bytes), Adam at 5e-4, evaluated once a pass.
        *-bs4) args=(--set data.task=mrpc --set federation.rounds=$((4 * fedsgd_rounds))
          --set train.batch_size=4 --set server.learning_rate=5e-4
          --set server.eval_every=$((4 * every))) ;;
        *) args=(--set data.task=mrpc --set federation.rounds="$fedsgd_rounds") ;;
      esac
      args+=(--set server.eval_truncations=final)
      if [[ "$cell" == *-iid-* ]]; then args+=(--set data.partition=iid); fi ;;
    mrpc-* | qqp-* | rte-*)
      case "${cell%%-*}" in
        qqp) args=(--set data.task=qqp-sample --set train.local_epochs=0.25)
          CENTRAL_ARGS=(--set train.learning_rate=1e-3) ;;
        mrpc) args=(--set data.task=mrpc)
          CENTRAL_ARGS=(--set train.learning_rate=5e-4) ;;
        *) args=(--set data.task="${cell%%-*}")
          CENTRAL_ARGS=() ;;
      esac
      case "${cell#*-}" in
        # The QQP sample's federations under label skew at fedavg's best rate on its validation
        # split (recipe_search.sh qqp2: 4e-3). The IID cells keep the recipe's 2e-3: the server
        # step was chosen with it, and 4e-3 with that step failed on MRPC's (mrpc-lr).
        dirichlet) if [[ "${cell%%-*}" == qqp ]]; then args+=(--set train.learning_rate=4e-3); fi ;;
        iid) args+=(--set data.partition=iid) ;;
        # The server learning rate chosen on IID validation (recipe_search.sh iid): eta = 2.
        iid-sgd2) args+=(--set data.partition=iid --set server.optimizer=sgd
          --set server.learning_rate=2.0) ;;
        *) echo "unknown cell $cell" >&2; exit 2 ;;
      esac ;;
    ablation)
      e3=experiments/e3_mrpc.toml
      run "$out/ablation" old-recipe "$e3" --set train.logit_adjustment=0 \
        --set train.lr_schedule=round
      run "$out/ablation" no-logit-adjustment "$e3" --set train.logit_adjustment=0
      run "$out/ablation" round-schedule "$e3" --set train.lr_schedule=round
      run "$out/ablation" fedprox-0.01 "$e3" --set train.proximal_mu=0.01
      run "$out/ablation" avgm-0.7 "$e3" --set server.optimizer=avgm --set server.momentum=0.7
      continue ;;
    *) echo "unknown cell $cell" >&2; exit 2 ;;
  esac
  for seed in ${SEEDS:-0 1 2}; do
    GRID_CONFIG="$config" GRID_REFS="${REFS-centralized}" GRID_RUNS="${HLORA_RUNS-e3-hlora}" \
      grid "$out/$cell" "$seed" "${args[@]}"
    GRID_CONFIG="$config" GRID_REFS="" \
      GRID_RUNS="${REST_RUNS-e3-zeropad e1-fedavg e1-hlora e3-flora}" \
      grid "$out/$cell" "$seed" "${args[@]}"
  done
done
run_plan "$plan" "${JOBS:-2}"
rm -f "$plan"
