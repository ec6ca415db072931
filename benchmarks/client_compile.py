"""``torch.compile`` of a client's model against eager mode: one local epoch, side by side.

Each mode trains one client (MiniLM unless named, LoRA rank 8, batch 16, hlora's own training
step with ``train.precision = "auto"``) over the same MRPC pairs, twice in alternation
(eager, compiled, eager, compiled) so that a busy machine slows both alike. A compiled model
first trains a few batches (the compile, reported as ``compile_s``), then the timed epoch.
``nn.Module.compile(dynamic=True)``: the batches have dynamic padding, so their lengths vary.

Prints one line per pass and, last, one JSON object with the mean epoch seconds of each mode,
``speedup`` (eager over compiled) and the compile seconds.

Example:
    OMP_NUM_THREADS=1 python benchmarks/client_compile.py --examples 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings

import torch
import transformers

from client_training import DROPOUT, RANK, SCALING, _objective, load_features, make_backbone
from hlora.adapters import LoraBank
from hlora.config import TrainConfig
from hlora.protocol import TrainInstruction
from hlora.runtime import ModelRuntime


def one_pass(
    model: str, features: list, args: argparse.Namespace, compiled: bool
) -> tuple[float, float]:
    """(warm-up seconds, epoch seconds) of a fresh client, compiled or eager."""
    backbone = make_backbone(model, model, 0)
    bank = LoraBank(backbone, [RANK], scaling=SCALING, dropout=DROPOUT)
    if compiled:
        bank.model.compile(dynamic=True)
    train = TrainConfig(
        local_epochs=1.0,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        device="cpu",
        precision="auto",
    )
    runtime = ModelRuntime(bank, _objective(backbone), train, torch.device("cpu"))
    instruction = TrainInstruction(
        "bench", 1, RANK, SCALING, None, bank.get_extras(RANK), init_seed=0, train_seed=0
    )
    start = time.perf_counter()
    runtime.train_client(instruction, features[: 4 * args.batch_size])
    warm = time.perf_counter() - start
    start = time.perf_counter()
    runtime.train_client(instruction, features)
    return warm, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--passes", type=int, default=2, help="passes of each mode")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    features = load_features(args.model, args.model, args.data_dir, args.examples, 128)
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    compile_s: list[float] = []
    for _ in range(args.passes):
        for mode in ("eager", "compiled"):
            warm, epoch = one_pass(args.model, features, args, mode == "compiled")
            seconds[mode].append(epoch)
            if mode == "compiled":
                compile_s.append(warm)
            print(f"{mode:<9} warm-up {warm:8.2f} s   epoch {epoch:8.2f} s", flush=True)
    eager, compiled = statistics.mean(seconds["eager"]), statistics.mean(seconds["compiled"])
    print(
        json.dumps(
            {
                "benchmark": "client_compile",
                "model": args.model,
                "examples": len(features),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "eager_s": seconds["eager"],
                "compiled_s": seconds["compiled"],
                "compile_s": compile_s,
                "speedup": eager / compiled,
            }
        )
    )


if __name__ == "__main__":
    main()
