# Shared by cpu_protocol.sh and full_protocol.sh (sourced, not run): one run, and one cell of the
# grid. The caller sets the array RUN_ARGS (arguments for every `hlora run`) and may set
# LOCAL_ARGS (extra arguments for the `local` reference, which evaluates every client's model)
# and CENTRAL_ARGS (extra arguments for the `centralized` reference).

# run FOLDER NAME CONFIG [--set ...]: one run, skipped when FOLDER/NAME/summary.json exists. With
# GRID_PLAN set to a file, the run is not started but appended to that file as one command line,
# for run_plan.
run() {
  local folder="$1" name="$2" config="$3"; shift 3
  if [[ -f "$folder/$name/summary.json" ]]; then echo "skip $folder/$name"; return; fi
  local call=(start_run "$folder" "$name" "$config" "${RUN_ARGS[@]}" --output "$folder"
    --set output.name="$name" "$@")
  if [[ -n "${GRID_PLAN:-}" ]]; then
    printf '%q ' "${call[@]}" >>"$GRID_PLAN"
    printf '\n' >>"$GRID_PLAN"
  else
    "${call[@]}"
  fi
}

# start_run FOLDER NAME ARGS...: `hlora run ARGS...` from nothing (an unfinished FOLDER/NAME is
# removed first). With GRID_RESUME=1 an unfinished run that saved its config.toml continues from
# its last finished round instead (`hlora run --resume`, its own saved configuration: use it only
# when the plan has not changed since the run started). With GRID_LOG=1 the output goes to
# FOLDER/NAME.log (appended to when resuming).
start_run() {
  local folder="$1" name="$2"; shift 2
  local call=(hlora run "$@") verb=start log="$folder/$name.log"
  if [[ "${GRID_RESUME:-0}" == 1 && -f "$folder/$name/config.toml" ]]; then
    call=(hlora run --resume "$folder/$name" --no-progress) verb=resume
  else
    rm -rf "${folder:?}/$name"
  fi
  echo "$(date -u +%H:%M:%S) $verb $folder/$name"
  if [[ "${GRID_LOG:-0}" == 1 ]]; then
    mkdir -p "$folder"
    if [[ "$verb" == start ]]; then : >"$log"; fi
    "${call[@]}" >>"$log" 2>&1 || { echo "FAILED $folder/$name"; return 1; }
    echo "$(date -u +%H:%M:%S) done $folder/$name"
  else
    "${call[@]}"
  fi
}

# run_plan FILE JOBS: the runs of a GRID_PLAN file, JOBS at a time in file order, each one's output
# in FOLDER/NAME.log. Fails when any run failed; the others still run.
run_plan() {
  local plan="$1" jobs="$2" grid
  grid="$(printf '%q' "$(realpath "${BASH_SOURCE[0]}")")"
  GRID_LOG=1 xargs -d '\n' -P "$jobs" -I{} bash -c "source $grid; {}" <"$plan"
}

# grid FOLDER "SEEDS" [--set ...]: for each seed, the federated runs named in GRID_RUNS (default
# all five: e3-hlora, e1-fedavg, e1-hlora, e3-zeropad, e3-flora; E1 is fedavg and hlora at rank 8,
# E3 hlora, zeropad and flora at ranks {2, 4, 8, 16}, E2 reuses e1-hlora and e3-hlora), then the
# references named in GRID_REFS (default "centralized local"). Every run starts from
# experiments/e1_mrpc.toml or e3_mrpc.toml, or from GRID_CONFIG with the experiment's ranks set.
grid() {
  local folder="$1" seeds="$2"; shift 2
  local seed job runs=" ${GRID_RUNS-e3-hlora e1-fedavg e1-hlora e3-zeropad e3-flora} "
  local refs=" ${GRID_REFS-centralized local} "
  # config_of E1|E3: the config file and the --set of one experiment's runs
  config_of() {
    if [[ -z "${GRID_CONFIG:-}" ]]; then
      cfg=("experiments/${1}_mrpc.toml")
    elif [[ "$1" == e1 ]]; then
      cfg=("$GRID_CONFIG" --set "federation.ranks=[8]")
    else
      cfg=("$GRID_CONFIG" --set "federation.ranks=[2,4,8,16]")
    fi
  }
  local cfg=()
  for seed in $seeds; do
    local s=(--set federation.seed="$seed" "$@")
    for job in e3-hlora e1-fedavg e1-hlora e3-zeropad e3-flora; do
      if [[ "$runs" == *" $job "* ]]; then
        config_of "${job%%-*}"
        run "$folder" "$job-s$seed" "${cfg[@]}" "${s[@]}" --set federation.strategy="${job#*-}"
      fi
    done
    config_of e3
    if [[ "$refs" == *" centralized "* ]]; then
      run "$folder" "e3-centralized-s$seed" "${cfg[@]}" "${s[@]}" \
        --set federation.strategy=centralized "${CENTRAL_ARGS[@]}"
    fi
    if [[ "$refs" == *" local "* ]]; then
      run "$folder" "e3-local-s$seed" "${cfg[@]}" "${s[@]}" --set federation.strategy=local \
        "${LOCAL_ARGS[@]}"
    fi
  done
}

# clients100 FOLDER "SEEDS" [--set ...]: E3 with 100 clients, 20 sampled per round, ranks {2, 4, 8}.
clients100() {
  local folder="$1" seeds="$2"; shift 2
  local seed strategy
  for seed in $seeds; do
    for strategy in hlora zeropad flora; do
      run "$folder" "e3-$strategy-s$seed" experiments/e3_mrpc_100clients.toml \
        --set federation.seed="$seed" --set federation.strategy="$strategy" "$@"
    done
  done
}
