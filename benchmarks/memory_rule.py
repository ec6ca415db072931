"""The ``memory`` rank rule's estimate (:mod:`hlora.memory`) against a client's measured peak.

For each case a fresh Python process imports everything, records its resident memory, builds
the model with one rank's adapter (what a client holds), trains that client for ``--steps``
steps on worst-case batches (``train.batch_size`` examples of ``model.max_length`` tokens, the
batch the estimate assumes), and records its peak: on a CPU the peak resident set
(``ru_maxrss``) minus the resident set before the model was loaded (the Python runtime, which
the estimate leaves out); on CUDA ``torch.cuda.max_memory_allocated``. Then it computes the
estimate in the same process (its one forward pass cannot raise the recorded training peak).

Each case runs twice on a CPU: with glibc's default allocator settings, and with
``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks are then always mapped and returned to the
system when freed; by default glibc raises that threshold as blocks are freed and keeps freed
memory in its heap, so the resident peak can far exceed what was ever in use at once).

Prints one row per case (estimate and its parts, measured peak, error of the estimate) and,
as its last line, one JSON object (also written to ``--json OUT``).

Examples:
    python benchmarks/memory_rule.py                       # MiniLM and SmolLM2-135M cases
    python benchmarks/memory_rule.py --cases minilm-b16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

CASES: dict[str, list[str]] = {
    "minilm-b16": ["model.max_length=128", "train.batch_size=16"],
    "minilm-b32-l64": ["model.max_length=64", "train.batch_size=32"],
    "smollm2-b8": [
        'model.name="smollm2-135m"',
        'model.task_type="causal-lm"',
        "model.max_length=256",
        "train.batch_size=8",
    ],
    "smollm2-b8-checkpointing": [
        'model.name="smollm2-135m"',
        'model.task_type="causal-lm"',
        "model.max_length=256",
        "train.batch_size=8",
        "train.gradient_checkpointing=true",
    ],
}
RANK = 8
ALLOCATORS = {"default": {}, "mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
_MIB = 2**20


def _rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc``)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * resource.getpagesize()


def measure(case: str, steps: int, extra: tuple[str, ...] = ()) -> dict[str, object]:
    """One case, in this process (see the module docstring)."""
    import torch

    from hlora.aggregation import LoraFactors  # noqa: F401  (imports before the baseline)
    from hlora.config import load_config
    from hlora.memory import footprint_fn, worst_case_examples
    from hlora.protocol import TrainInstruction
    from hlora.stack import build_stack

    overrides = (*CASES[case], f"federation.ranks=[{RANK}]", "train.local_epochs=1", *extra)
    config = load_config(None, overrides)
    cuda = torch.cuda.is_available()
    before = _rss_bytes()
    stack = build_stack(config, (RANK,))
    runtime = stack.runtime
    loaded = _rss_bytes() - before  # the model as it sits in memory
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    examples = worst_case_examples(
        config.data.task, config.train.batch_size * steps, config.model.max_length
    )
    features = runtime.objective.train_features(examples)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    instruction = TrainInstruction(
        client_id="client00",
        round_num=1,
        rank=RANK,
        scaling=config.model.lora_scaling,
        factors=None,
        extras=runtime.bank.get_extras(RANK),
        init_seed=1,
        train_seed=1,
    )
    reply = runtime.train_client(instruction, features)
    if cuda:
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    estimate = footprint_fn(runtime, config)(RANK)
    return {
        "case": case,
        "device": "cuda" if cuda else "cpu",
        "steps": reply.steps,
        "estimate_mib": estimate.total / _MIB,
        "base_mib": estimate.base_weights / _MIB,
        "activations_mib": estimate.activations / _MIB,
        "state_mib": estimate.training_state / _MIB,
        "measured_mib": measured / _MIB,
        "runtime_mib": before / _MIB,
        "loaded_mib": loaded / _MIB,
        "load_peak_mib": load_peak / _MIB,
        "error": estimate.total / measured - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=2, help="training steps per case")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    parser.add_argument(
        "--set", action="append", default=[], help="a configuration override for every case"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, tuple(args.set))))
        return
    import torch

    # glibc's settings change only the resident set on a CPU, not what CUDA allocates
    allocators = {"default": {}} if torch.cuda.is_available() else ALLOCATORS
    rows = []
    for case in args.cases:
        for allocator, env in allocators.items():
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    case,
                    "--steps",
                    str(args.steps),
                    *(f"--set={o}" for o in args.set),
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({**row, "allocator": allocator})
    print(f"platform: {platform.processor() or platform.machine()}, rank {RANK}")
    print(
        f"{'case':26} {'allocator':>10} {'estimate':>9} {'base':>7} {'activ.':>7} {'state':>6} "
        f"{'measured':>9} {'error':>7}  (MiB; runtime before the model not counted)"
    )
    for r in rows:
        print(
            f"{r['case']:26} {r['allocator']:>10} {r['estimate_mib']:9.1f} {r['base_mib']:7.1f} "
            f"{r['activations_mib']:7.1f} {r['state_mib']:6.1f} {r['measured_mib']:9.1f} "
            f"{r['error']:+7.1%}"
        )
    result = {"rank": RANK, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
