"""Client training benchmark: hlora's local training against Hugging Face ``Trainer`` + peft.

One client's local epoch over the same MRPC pairs, same model, LoRA rank, batch size, learning
rate and precision, measured side by side in one process:

- **hlora** -- :meth:`hlora.runtime.ModelRuntime.train_client` (length-grouped batches with
  dynamic padding, AdamW, fused on CUDA; ``train.precision = "auto"``: bf16 autocast on CUDA and
  on CPUs with native bf16 instructions).
- **hlora-fp32** -- the same with ``train.precision = "fp32"``: what hlora did on every CPU
  before the precision option (the ratio ``speedup_vs_fp32`` is the gain of the option).
- **trainer-dynamic** -- ``transformers.Trainer`` with its default ``TrainingArguments`` and
  ``DataCollatorWithPadding`` (dynamic padding per random batch): what a user writing a
  Trainer loop gets.
- **trainer-padded** -- the same ``Trainer`` on pairs padded to ``--max-length`` tokens, as the
  reference GLUE script (``run_glue.py``, ``pad_to_max_length=True``) prepares them.

The figure of merit is *useful* tokens per second: the non-padding tokens of the epoch (the same
for every method) divided by its wall time. Each method runs one warm-up of a few steps first.

Prints a table, then as its last line one JSON object with ``speedup_vs_trainer`` (hlora over
trainer-dynamic) and ``speedup_vs_trainer_padded``.

Examples:
    python benchmarks/client_training.py                       # all-MiniLM-L6-v2, CPU
    python benchmarks/client_training.py --model roberta-large-random --device cuda \
        --examples 3668 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model

from floors import lora_training_flops_per_token, matmul_rate, sync
from hlora.adapters import LoraBank
from hlora.config import TrainConfig
from hlora.data.collate import DynamicPaddingCollator, tokenize_pairs
from hlora.data.glue import get_task, load_task
from hlora.models import Backbone, load_backbone
from hlora.objectives import Objective, SequenceClassification
from hlora.protocol import TrainInstruction
from hlora.runtime import ModelRuntime

RANK = 8
SCALING = 2.0
DROPOUT = 0.05


def roberta_large_random(tokenizer: Any, seed: int) -> Backbone:
    """A randomly initialised model of RoBERTa-large's shape (355M parameters).

    Token ids come from ``tokenizer`` (all below RoBERTa's vocabulary size); only the shapes
    and the sequence lengths matter for speed.
    """
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(
        vocab_size=50265,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=int(tokenizer.pad_token_id),
        num_labels=2,
    )
    model = transformers.RobertaForSequenceClassification(config)
    return Backbone(model, tokenizer, "roberta-large-random", "encoder", ("query", "value"))


def make_backbone(name: str, tokenizer_source: str, seed: int) -> Backbone:
    """A fresh backbone (``roberta-large-random``, or anything load_backbone takes)."""
    if name == "roberta-large-random":
        return roberta_large_random(load_backbone(tokenizer_source, 2, seed=seed).tokenizer, seed)
    return load_backbone(name, 2, seed=seed)


def _objective(backbone: Backbone) -> Objective:
    """The classification objective (its batches and loss) for pre-tokenized MRPC features."""
    return SequenceClassification(
        backbone.tokenizer, get_task("mrpc"), architecture=backbone.architecture, max_length=128
    )


def load_features(
    model_name: str, tokenizer_source: str, data_dir: str | None, examples: int, max_length: int
) -> Any:
    """The first ``examples`` MRPC training pairs, tokenized without padding."""
    task = load_task("mrpc", data_dir, train_limit=examples)
    tokenizer = load_backbone(tokenizer_source, 2).tokenizer
    features = tokenize_pairs(tokenizer, task.train, max_length)
    if model_name == "roberta-large-random":  # one segment type only
        for f in features:
            f.pop("token_type_ids", None)
    return features


def run_hlora(
    backbone: Backbone,
    features: list[dict[str, Any]],
    args: argparse.Namespace,
    epochs: float,
    precision: str = "auto",
) -> float:
    """Seconds of ``epochs`` of hlora local training (one client, rank 8)."""
    device = torch.device(args.device)
    bank = LoraBank(backbone, [RANK], scaling=SCALING, dropout=DROPOUT)
    train = TrainConfig(
        local_epochs=epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        device=args.device,
        precision=precision,
    )
    runtime = ModelRuntime(bank, _objective(backbone), train, device)
    instruction = TrainInstruction(
        "bench", 1, RANK, SCALING, None, bank.get_extras(RANK), init_seed=0, train_seed=0
    )
    sync(device)
    start = time.perf_counter()
    runtime.train_client(instruction, features)
    sync(device)
    return time.perf_counter() - start


def run_trainer(
    backbone: Backbone,
    features: list[dict[str, Any]],
    args: argparse.Namespace,
    *,
    padded: bool,
) -> float:
    """Seconds of one epoch of ``Trainer`` + peft with default arguments."""
    import datasets

    device = torch.device(args.device)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=RANK,
        lora_alpha=SCALING * RANK,  # type: ignore[arg-type]
        lora_dropout=DROPOUT,
        target_modules=list(backbone.default_target_modules),
    )
    model = get_peft_model(backbone.model, lora)
    rows = features
    if padded:
        pad = DynamicPaddingCollator(backbone.tokenizer, pad_to_multiple_of=args.max_length)
        rows = []
        for f in features:
            batch = pad([f])
            rows.append({k: v[0].tolist() if v.dim() > 1 else int(v[0]) for k, v in batch.items()})
    dataset = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            num_train_epochs=1,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=transformers.DataCollatorWithPadding(backbone.tokenizer),
        )
        sync(device)
        start = time.perf_counter()
        trainer.train()
        sync(device)
        return time.perf_counter() - start


def _fresh(build: Callable[[], Backbone], device: torch.device) -> Backbone:
    backbone = build()
    backbone.model.to(device)
    return backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm | roberta-large-random | ...")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="model name or folder whose tokenizer to use (default: the model's own; "
        "minilm for roberta-large-random)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    parser.add_argument("--examples", type=int, default=512, help="MRPC pairs in the epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)

    tokenizer_source = args.tokenizer or (
        "minilm" if args.model == "roberta-large-random" else args.model
    )
    features = load_features(
        args.model, tokenizer_source, args.data_dir, args.examples, args.max_length
    )
    useful = sum(len(f["input_ids"]) for f in features)
    warm_rows = features[: args.batch_size * args.warmup_steps]

    def build() -> Backbone:
        return make_backbone(args.model, tokenizer_source, args.seed)

    results: dict[str, float] = {}
    methods: dict[str, tuple[Callable[[Backbone], float], Callable[[Backbone], float]]] = {
        "hlora": (
            lambda b: run_hlora(b, features, args, 1.0),
            lambda b: run_hlora(b, warm_rows, args, 1.0),
        ),
        "hlora-fp32": (
            lambda b: run_hlora(b, features, args, 1.0, "fp32"),
            lambda b: run_hlora(b, warm_rows, args, 1.0, "fp32"),
        ),
        "trainer-dynamic": (
            lambda b: run_trainer(b, features, args, padded=False),
            lambda b: run_trainer(b, warm_rows, args, padded=False),
        ),
        "trainer-padded": (
            lambda b: run_trainer(b, features, args, padded=True),
            lambda b: run_trainer(b, warm_rows, args, padded=True),
        ),
    }
    for label, (timed, warm) in methods.items():
        warm(_fresh(build, device))
        results[label] = timed(_fresh(build, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    padded_tokens = len(features) * args.max_length
    mean_length = useful / len(features)
    probe = build().model
    flops_per_token = lora_training_flops_per_token(probe, mean_length)
    hidden = int(probe.config.hidden_size)
    rate = matmul_rate(
        device,
        int(args.batch_size * mean_length),
        hidden,
        4 * hidden,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
    floor_s = useful * flops_per_token / rate
    print(
        f"client training, {args.model}, {len(features)} MRPC pairs ({useful} useful tokens, "
        f"{useful / len(features):.1f} per pair), batch {args.batch_size}, LoRA r={RANK} on "
        f"{device} ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"{'method':<18}{'seconds':>10}{'useful tok/s':>15}{'vs trainer-dynamic':>20}"
        f"{'floor / time':>14}"
    )
    for label, seconds in results.items():
        ratio = results["trainer-dynamic"] / seconds
        print(
            f"{label:<18}{seconds:>10.2f}{useful / seconds:>15.0f}{ratio:>19.2f}x"
            f"{floor_s / seconds:>13.1%}"
        )
    print(
        f"floor: {flops_per_token / 1e6:.1f} MFLOP per useful token at the measured matrix rate "
        f"{rate / 1e9:.1f} GFLOP/s (a {int(args.batch_size * mean_length)}x{hidden} @ "
        f"{hidden}x{4 * hidden} product) = {floor_s:.2f} s"
    )
    print(
        f"(trainer-padded processes {padded_tokens} tokens, {padded_tokens / useful:.2f}x useful)"
    )
    print(
        json.dumps(
            {
                "benchmark": "client_training",
                "model": args.model,
                "device": str(device),
                "examples": len(features),
                "useful_tokens": useful,
                "seconds": {k: round(v, 4) for k, v in results.items()},
                "useful_tokens_per_s": {k: round(useful / v, 1) for k, v in results.items()},
                "floor_s": round(floor_s, 4),
                "matmul_gflops": round(rate / 1e9, 2),
                "speedup_vs_trainer": round(results["trainer-dynamic"] / results["hlora"], 3),
                "speedup_vs_fp32": round(results["hlora-fp32"] / results["hlora"], 3),
                "speedup_vs_trainer_padded": round(results["trainer-padded"] / results["hlora"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
