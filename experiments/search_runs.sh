# Sourced by recipe_search.sh and sft_search.sh: runs the stage's RUNS (specs "NAME|ARGS"),
# JOBS at a time, each on one CPU thread, as `$HLORA run "${BASE[@]}" ARGS --set
# output.name=NAME` with its log in $OUT/NAME.log. A finished run (summary.json present) is
# skipped, an unfinished one starts again from nothing, or with RESUME=1 continues from its last
# finished round when it saved its config.toml (`hlora run --resume`, its own saved
# configuration: only when the stage has not changed since); with ONLY=NAME set, only NAME runs.

run_one() {
  local name="${1%%|*}" args="${1#*|}"
  [ -n "${ONLY:-}" ] && [ "$name" != "$ONLY" ] && return 0
  [ -f "$OUT/$name/summary.json" ] && return 0
  local call=("$HLORA" run --resume "$OUT/$name" --no-progress)
  if [ "${RESUME:-0}" != 1 ] || [ ! -f "$OUT/$name/config.toml" ]; then
    rm -rf "${OUT:?}/$name"
    mkdir -p "$OUT"
    : > "$OUT/$name.log"
    # shellcheck disable=SC2206
    call=("$HLORA" run "${BASE[@]}" $args --set "output.name=$name")
  fi
  OMP_NUM_THREADS=1 "${call[@]}" >> "$OUT/$name.log" 2>&1 || echo "failed: $name" >&2
}

run_searches() {
  local running=0 spec
  for spec in "${RUNS[@]}"; do
    run_one "$spec" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
  done
  wait
}
