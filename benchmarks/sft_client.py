"""SFT client benchmark: hlora's causal-LM client step against TRL's ``SFTTrainer`` + peft.

One client's local epoch of instruction tuning over the same MRPC pairs, rendered as the same
chat conversations (a user turn asking whether two sentences mean the same thing, an assistant
turn answering ``yes`` or ``no``), on the same model, with the same LoRA rank, target modules,
scaling and dropout, the same batch size and learning rate, the loss on the answer tokens only:

- **hlora** -- :meth:`hlora.runtime.ModelRuntime.train_client` with the
  :class:`~hlora.objectives.CausalLanguageModeling` objective, the stack built by
  :func:`hlora.stack.build_stack` from a ``model.task_type = "causal-lm"`` configuration
  (left padding of length-grouped batches, the LM head on the last ``K + 1`` positions only,
  bf16 autocast per ``train.precision = "auto"``).
- **trl-sft-default** -- ``trl.SFTTrainer`` with a ``peft.LoraConfig`` and TRL's default
  ``SFTConfig`` (only the output folder, batch size, learning rate, one epoch, the seed, and
  no reports, checkpoints or progress bar are set), on a conversational prompt/completion
  dataset, for which TRL's default is the loss on the completion only.

The script checks that both sides train on the same token sequences with the same labelled
positions. The figure of merit is *useful* tokens per second: the non-padding tokens of the
epoch (the same for both) over the wall time of the training loop (tokenization and model
set-up excluded on both sides). Each method runs one short warm-up first; then the timed
epochs alternate between the methods (``--repeats`` of each, the order swapped every repeat,
so that a machine shared with other work slows both alike) and the median of each is reported.

With ``--trl-variants`` two more ``SFTTrainer`` rows take TRL's defaults towards hlora's
settings: ``trl-sft-no-gc`` (no gradient checkpointing) and ``trl-sft-no-gc-grouped`` (also
``train_sampling_strategy = "group_by_length"``), to show where the ratio comes from.

Prints the platform, a table with the ratio against ``trl-sft-default``, the settings in which
TRL's defaults differ from hlora's, then as its last line one JSON object (also written to
``--json OUT``). On a CPU shared with other work, ``OMP_NUM_THREADS=1`` keeps each side from
waiting on a second thread that is not running (measured here: 3-6x slower steps with two
threads on two busy cores).

Examples:
    python benchmarks/sft_client.py                          # SmolLM2-135M-Instruct, CPU
    python benchmarks/sft_client.py --examples 256 --repeats 5 --json sft.json
    OMP_NUM_THREADS=1 python benchmarks/sft_client.py --trl-variants   # a busy CPU
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, TaskType
from transformers.trainer_callback import PrinterCallback

from floors import sync
from hlora.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from hlora.data.glue import Example, load_task
from hlora.objectives.causal_lm import IGNORE_INDEX
from hlora.objectives.prompts import pair_instruction
from hlora.protocol import TrainInstruction
from hlora.runtime import cpu_has_native_bf16
from hlora.stack import build_stack, load_run_backbone
from hlora.tasktypes import CAUSAL_LM

BASELINE = "trl-sft-default"
#: ``SFTConfig`` changes that take TRL's default settings one at a time towards hlora's, to
#: see where the ratio comes from (``--trl-variants``).
TRL_VARIANTS: dict[str, dict[str, Any]] = {
    "trl-sft-no-gc": {"gradient_checkpointing": False},
    "trl-sft-no-gc-grouped": {
        "gradient_checkpointing": False,
        "train_sampling_strategy": "group_by_length",
    },
}
TASK = "mrpc"

Sequences = list[tuple[tuple[int, ...], tuple[int, ...]]]
"""``(input_ids, labels)`` of every training sequence, sorted."""


class TokenCounter:
    """Wraps a collate function and counts the tokens of the batches it builds.

    Attributes:
        useful: Non-padding tokens (``attention_mask`` ones).
        processed: Tokens the model runs on, padding included (``rows * columns``).
    """

    def __init__(self, collate: Callable[..., dict[str, Any]]) -> None:
        self.collate = collate
        self.useful = 0
        self.processed = 0

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        batch = self.collate(*args, **kwargs)
        mask = batch["attention_mask"]
        self.useful += int(mask.sum())
        self.processed += int(mask.numel())
        return batch


def run_config(args: argparse.Namespace) -> RunConfig:
    """The configuration hlora's side is built from (and the model both sides load)."""
    return RunConfig(
        model=ModelConfig(
            name=args.model,
            task_type=CAUSAL_LM,
            max_length=args.max_length,
            lora_scaling=args.scaling,
            lora_dropout=args.dropout,
        ),
        data=DataConfig(task=TASK, data_dir=args.data_dir or ""),
        train=TrainConfig(
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            device=args.device,
            precision="auto",
        ),
    )


def conversations(examples: Sequence[Example]) -> list[dict[str, Any]]:
    """The examples as TRL's conversational prompt/completion rows (hlora's wording)."""
    instruction = pair_instruction(TASK)
    return [
        {
            "prompt": [{"role": "user", "content": instruction.render(example)}],
            "completion": [{"role": "assistant", "content": instruction.answers[example.label]}],
        }
        for example in examples
    ]


def _sequences(rows: Sequence[dict[str, Any]]) -> Sequences:
    return sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)


def _targets(config: RunConfig, default: Sequence[str]) -> list[str]:
    return list(config.model.target_modules or default)


def run_hlora(
    config: RunConfig, examples: Sequence[Example], rank: int
) -> tuple[float, float, TokenCounter, Sequences, dict[str, Any]]:
    """One epoch of hlora's client step on a freshly loaded model.

    Returns:
        Seconds of ``train_client``, its mean loss, the token counts of its batches, the
        sequences it trained on and its settings.
    """
    stack = build_stack(config, [rank])
    features = stack.objective.train_features(examples)
    counter = TokenCounter(stack.objective.collate)
    stack.objective.collate = counter  # type: ignore[method-assign]
    instruction = TrainInstruction(
        "bench",
        1,
        rank,
        config.model.lora_scaling,
        None,
        stack.bank.get_extras(rank),
        init_seed=0,
        train_seed=0,
    )
    device = stack.runtime.device
    sync(device)
    start = time.perf_counter()
    reply = stack.runtime.train_client(instruction, features)
    sync(device)
    seconds = time.perf_counter() - start
    train = config.train
    settings = {
        "padding": "left, per length-grouped batch, to a multiple of 8",
        "batch order": "length-grouped (mega-batches of 50 batches sorted by length)",
        "precision": "bf16 autocast" if stack.runtime.bf16 else "fp32",
        "gradient checkpointing": "off",
        "LM head": "last K+1 positions (logits_to_keep)",
        "packing": "off",
        "loss": "completion tokens only",
        "optimizer": "adamw_torch (fused on CUDA)",
        "lr schedule": f"linear, warm-up {train.warmup_ratio:.0%} of the steps",
        "max grad norm": train.max_grad_norm,
        "weight decay": train.weight_decay,
        "max length": f"{config.model.max_length} (prompt cut from the left)",
        "LoRA targets": ", ".join(sorted(_targets(config, stack.backbone.default_target_modules))),
    }
    return seconds, reply.loss, counter, _sequences(features), settings


def run_trl(
    config: RunConfig,
    examples: Sequence[Example],
    rank: int,
    seed: int,
    overrides: dict[str, Any] | None = None,
) -> tuple[float, float, TokenCounter, Sequences, dict[str, Any]]:
    """One epoch of ``SFTTrainer`` + peft with TRL's defaults on a freshly loaded model.

    Args:
        config: The run configuration (model, LoRA, batch size, learning rate, device).
        examples: The MRPC pairs of the epoch.
        rank: The LoRA rank.
        seed: ``SFTConfig.seed``.
        overrides: ``SFTConfig`` fields set away from TRL's defaults (the variants).

    Returns:
        Seconds of ``trainer.train()``, its mean loss, the token counts of its batches, the
        sequences it trained on and its settings.
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    backbone = load_run_backbone(config)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=config.model.lora_scaling * rank,  # type: ignore[arg-type]
        lora_dropout=config.model.lora_dropout,
        target_modules=_targets(config, backbone.default_target_modules),
    )
    device = torch.device(config.train.device)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=config.train.batch_size,
            learning_rate=config.train.learning_rate,
            num_train_epochs=1,
            seed=seed,
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            **(overrides or {}),
        )
        trainer = SFTTrainer(
            model=backbone.model,
            args=args,
            train_dataset=datasets.Dataset.from_list(conversations(examples)),
            processing_class=backbone.tokenizer,
            peft_config=lora,
        )
        trainer.remove_callback(PrinterCallback)  # the final metrics line
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        sync(device)
        start = time.perf_counter()
        result = trainer.train()
        sync(device)
        seconds = time.perf_counter() - start
    precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32"
    multiple = args.pad_to_multiple_of
    settings = {
        "padding": "right, per batch" + (f", to a multiple of {multiple}" if multiple else ""),
        "batch order": str(args.train_sampling_strategy),
        "precision": precision,
        "gradient checkpointing": "on" if args.gradient_checkpointing else "off",
        "LM head": _trl_lm_head(device),
        "packing": "on" if args.packing else ("padding-free" if args.padding_free else "off"),
        "loss": "completion tokens only" if trainer.completion_only_loss else "every token",
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "lr schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, "
        f"warm-up {args.warmup_steps} steps",
        "max grad norm": args.max_grad_norm,
        "weight decay": args.weight_decay,
        "max length": f"{args.max_length} ({args.truncation_mode})",
        "LoRA targets": ", ".join(sorted(lora.target_modules or ())),
    }
    sequences = _sequences(trainer.train_dataset)  # type: ignore[arg-type]
    del trainer
    return seconds, float(result.training_loss), counter, sequences, settings


def _trl_lm_head(device: torch.device) -> str:
    """How TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) runs on ``device``."""
    try:  # a private helper: the kernel's own test for its Triton path
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        return "fused, tiled over the vocabulary"
    if _use_triton(device):
        return "fused Triton kernel on the labelled positions only"
    return "fused, tiled, on every position, products in fp32 (no Triton here)"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _labelled(sequences: Sequences) -> int:
    return sum(sum(1 for t in labels if t != IGNORE_INDEX) for _, labels in sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="a decoder: hlora alias, local folder or hub id"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    parser.add_argument("--examples", type=int, default=64, help="MRPC pairs in the epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--scaling", type=float, default=2.0, help="lora_alpha / r")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=256, help="hlora's model.max_length")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each method")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-variants",
        action="store_true",
        help="also time SFTTrainer without gradient checkpointing, and with length grouping",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the JSON")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets
    import trl

    datasets.disable_progress_bars()

    config = run_config(args)
    examples = load_task(TASK, args.data_dir, train_limit=args.examples).train
    warm = examples[: args.batch_size * args.warmup_steps]

    methods: dict[str, Callable[[Sequence[Example]], tuple[Any, ...]]] = {
        "hlora": lambda ex: run_hlora(config, ex, args.rank),
        BASELINE: lambda ex: run_trl(config, ex, args.rank, args.seed),
    }
    if args.trl_variants:
        for label, overrides in TRL_VARIANTS.items():
            methods[label] = functools.partial(
                lambda ex, o: run_trl(config, ex, args.rank, args.seed, o), o=overrides
            )
    for run in methods.values():
        run(warm)
        gc.collect()
    seconds: dict[str, list[float]] = {label: [] for label in methods}
    losses: dict[str, list[float]] = {label: [] for label in methods}
    counters: dict[str, TokenCounter] = {}
    sequences: dict[str, Sequences] = {}
    settings: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for label in order:
            s, loss, counter, seqs, used = methods[label](examples)
            seconds[label].append(s)
            print(f"repeat {repeat + 1}, {label}: {s:.2f} s", file=sys.stderr, flush=True)
            losses[label].append(loss)
            counters[label], sequences[label], settings[label] = counter, seqs, used
            gc.collect()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()

    same = sequences["hlora"] == sequences[BASELINE]
    useful = {label: sum(len(ids) for ids, _ in seqs) for label, seqs in sequences.items()}
    if useful["hlora"] != useful[BASELINE] or any(
        c.useful != useful[k] for k, c in counters.items()
    ):
        raise SystemExit(f"the two sides trained on different token counts: {useful}")
    tokens = useful["hlora"]
    median = {label: statistics.median(v) for label, v in seconds.items()}
    ratio = {label: median[BASELINE] / m for label, m in median.items()}

    labelled = _labelled(sequences["hlora"])
    print(
        f"SFT client epoch, {args.model}, {len(examples)} MRPC pairs as chat turns ({tokens} "
        f"useful tokens, {tokens / len(examples):.1f} per pair, {labelled} labelled), "
        f"batch {args.batch_size}, LoRA r={args.rank}, lr {args.learning_rate}, "
        f"{args.repeats} alternating repeats (median)"
    )
    print(
        f"on {args.device}: {cpu_name()} ({platform.machine()}, native bf16: "
        f"{cpu_has_native_bf16()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}"
    )
    print(
        "same token sequences and labelled positions on both sides: "
        + ("yes" if same else "NO (same counts, different sequences)")
    )
    print(
        f"{'method':<24}{'seconds':>10}{'useful tok/s':>15}{'vs ' + BASELINE:>22}"
        f"{'padded / useful':>17}{'mean loss':>11}"
    )
    for label in methods:
        padded = counters[label].processed / tokens
        print(
            f"{label:<24}{median[label]:>10.2f}{tokens / median[label]:>15.0f}"
            f"{ratio[label]:>21.2f}x{padded:>17.2f}{statistics.median(losses[label]):>11.4f}"
        )
    for label, values in seconds.items():
        print(f"{label} per repeat (s): {', '.join(f'{s:.2f}' for s in values)}")
    print(f"settings where {BASELINE} differs from hlora:")
    for key, ours in settings["hlora"].items():
        theirs = settings[BASELINE][key]
        if str(ours) != str(theirs):
            print(f"  {key:<24} hlora: {ours}  |  {BASELINE}: {theirs}")
    record = {
        "benchmark": "sft_client",
        "model": args.model,
        "device": args.device,
        "cpu": cpu_name(),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "examples": len(examples),
        "batch_size": args.batch_size,
        "rank": args.rank,
        "learning_rate": args.learning_rate,
        "repeats": args.repeats,
        "baseline": BASELINE,
        "useful_tokens": tokens,
        "same_sequences": same,
        "seconds": {k: [round(s, 4) for s in v] for k, v in seconds.items()},
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "useful_tokens_per_s": {k: round(tokens / v, 1) for k, v in median.items()},
        "processed_tokens": {k: c.processed for k, c in counters.items()},
        "mean_loss": {k: round(statistics.median(v), 5) for k, v in losses.items()},
        "ratio_vs_baseline": {k: round(v, 3) for k, v in ratio.items()},
        "speedup_vs_trl": round(ratio["hlora"], 3),
        "settings": settings,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
