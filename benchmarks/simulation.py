"""Simulation benchmark: one federated round of K clients against their isolated training.

For each K (default 10 and 50) a fresh process builds a federation of K clients (MRPC, IID,
``--per-client`` pairs each, ranks cycled over {2, 4, 8, 16}, one local epoch) on one shared
model, then measures, side by side:

- **isolated** -- the sum over the K clients of one client's local training alone
  (:meth:`hlora.runtime.ModelRuntime.train_client` called directly, nothing else);
- **round** -- one whole round of the in-process engine (:meth:`hlora.server.RoundLoop.run_round`:
  instructions, the same K trainings, validation, hlora aggregation, metrics) plus the
  checkpoint write. No evaluation.

``overhead = round / isolated`` (target <= 1.1). Memory: the process's peak resident set
(``ru_maxrss``) after the model is loaded and after the round, and on CUDA the peak allocated
memory; flat in K means one base model whatever the number of clients.

Prints a table, then as its last line one JSON object with ``overhead`` and ``peak_rss_mib`` per K.

Examples:
    python benchmarks/simulation.py                    # K = 10 and 50, CPU
    python benchmarks/simulation.py --clients 10 50 100 --per-client 64 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from floors import sync
from hlora.checkpoint import save_state
from hlora.config import fingerprint, load_config
from hlora.federation import build_federation, make_loop
from hlora.report import RoundProgress


def _peak_rss_mib() -> float:
    """Peak resident set of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float | None:
    """Resident set of this process now (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return None
    return pages * resource.getpagesize() / 2**20


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def measure(
    clients: int,
    per_client: int,
    device: str,
    data_dir: str | None,
    model: str = "minilm",
    extra_overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One K: build, warm up, time isolated trainings and one round (run in a fresh process).

    ``extra_overrides`` are further ``section.key=value`` settings (applied last).
    """
    overrides = [
        f"model.name={json.dumps(model)}",
        "data.task=mrpc",
        "data.partition=iid",
        f"data.train_limit={clients * per_client}",
        "data.dev_limit=16",
        f"federation.num_clients={clients}",
        "federation.rounds=2",
        "train.local_epochs=1",
        f"train.device={device}",
        "server.eval_every=2",
        "server.eval_truncations=never",
        "output.progress=false",
    ]
    if data_dir:
        overrides.append(f"data.data_dir={json.dumps(data_dir)}")
    config = load_config(None, (*overrides, *extra_overrides))
    federation = build_federation(config)
    torch_device = federation.runtime.device
    rss_loaded = _peak_rss_mib()
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        loop = make_loop(federation, run_dir, RoundProgress(2, enabled=False))
        state = loop.initial_state()
        instructions = [loop.instruction(state, c, 1) for c in loop.sample(1)]
        runtime = federation.runtime
        runtime.train_client(instructions[0], federation.train_features[instructions[0].client_id])
        rss_warm = _current_rss_mib()
        isolated = 0.0
        for instruction in instructions:
            sync(torch_device)
            start = time.perf_counter()
            runtime.train_client(instruction, federation.train_features[instruction.client_id])
            sync(torch_device)
            isolated += time.perf_counter() - start
        sync(torch_device)
        start = time.perf_counter()
        new_state, record = loop.run_round(state, 1)
        loop.metrics.append(record)
        save_state(run_dir / "checkpoint.safetensors", new_state, fingerprint(config))
        sync(torch_device)
        round_s = time.perf_counter() - start
        rss_after = _current_rss_mib()
        _trim_heap()  # what is still held, without the allocator's free pages
        rss_trimmed = _current_rss_mib()
    result: dict[str, Any] = {
        "clients": clients,
        "examples": sum(len(f) for f in federation.train_features.values()),
        "isolated_s": isolated,
        "round_s": round_s,
        "overhead": round_s / isolated,
        "rss_loaded_mib": rss_loaded,
        "rss_warm_mib": rss_warm,
        "rss_after_round_mib": rss_after,
        "rss_trimmed_mib": rss_trimmed,
        "peak_rss_mib": _peak_rss_mib(),
    }
    if torch_device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(torch_device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--per-client", type=int, default=24, help="MRPC pairs per client")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="minilm", help="any name hlora run takes")
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single is not None:
        logging.disable(logging.WARNING)
        result = measure(args.single, args.per_client, args.device, args.data_dir, args.model)
        print(json.dumps(result))
        return
    rows = []
    for k in args.clients:
        cmd = [sys.executable, __file__, "--single", str(k), "--per-client", str(args.per_client)]
        cmd += ["--device", args.device, "--model", args.model]
        cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"K={k} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"simulation, {args.model}, {args.per_client} MRPC pairs per client, one local epoch, "
        f"batch 16 ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device})"
    )
    header = f"{'K':>4}{'isolated s':>12}{'round s':>10}{'overhead':>10}"
    header += f"{'RSS loaded MiB':>16}{'RSS peak MiB':>14}"
    cuda = "cuda_peak_mib" in rows[0]
    print(header + (f"{'CUDA peak MiB':>15}" if cuda else ""))
    for r in rows:
        line = f"{r['clients']:>4}{r['isolated_s']:>12.2f}{r['round_s']:>10.2f}"
        line += f"{r['overhead']:>9.3f}x{r['rss_loaded_mib']:>16.0f}{r['peak_rss_mib']:>14.0f}"
        print(line + (f"{r['cuda_peak_mib']:>15.0f}" if cuda else ""))
    print(
        json.dumps(
            {
                "benchmark": "simulation",
                "overhead": {str(r["clients"]): round(r["overhead"], 4) for r in rows},
                "peak_rss_mib": {str(r["clients"]): round(r["peak_rss_mib"], 1) for r in rows},
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
