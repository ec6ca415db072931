"""Run configuration: TOML parsed once, at the edge, into frozen dataclasses.

Every field carries a help text (``field(metadata={"help": ...})``) and is checked when the
dataclass is built; a bad value raises :class:`hlora.errors.ConfigError` naming the key (as
``section.key``) and what is allowed. Unknown keys are errors too. Everything after
:func:`load_config` receives typed objects, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hlora.aggregation.factored import FACTOR_SPLITS, SVD_METHODS
from hlora.aggregation.registry import STRATEGY_NAMES
from hlora.data.glue import INSTRUCTIONS, TASK_NAMES
from hlora.data.partition import ALL_PARTITION_SCHEMES
from hlora.errors import CheckpointError, ConfigError
from hlora.quantization import NO_QUANTIZATION, QUANTIZATIONS
from hlora.schedule import RUN_SCHEDULES
from hlora.tasktypes import CAUSAL_LM, SEQ_CLS, SYSTEM_NONE, SYSTEM_TEMPLATE, TASK_TYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REFERENCE_MODES: tuple[str, ...] = ("centralized", "local")
ALL_MODES: tuple[str, ...] = (*STRATEGY_NAMES, *REFERENCE_MODES)
RANK_RULES: tuple[str, ...] = ("cycle", "list", "memory")
TRUNCATION_EVALS: tuple[str, ...] = ("never", "final", "every")
LR_SCHEDULES: tuple[str, ...] = ("round", *RUN_SCHEDULES)  # train.lr_schedule
SERVER_OPTIMIZERS: tuple[str, ...] = ("none", "sgd", "avgm", "adam", "yogi")
OPTIMIZER_STATES: tuple[str, ...] = ("auto", "dense", "factored")
HLORA_SPACES: tuple[str, ...] = ("delta", "server-factors", "factor-steps")  # server.hlora_space
RESIDUALS: tuple[str, ...] = ("drop", "frozen")  # server.residual
WINDOWS: tuple[str, ...] = ("leading", "rolling")  # server.window
CLIENT_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
HEAD_CALIBRATIONS: tuple[str, ...] = ("none", "ccvr")  # server.head_calibration (hlora.calibration)
_ADAM_EPSILON = 1e-8
"""AdamW's default epsilon (torch's)."""
CONFIG_FILE = "config.toml"  # the configuration a run folder holds, as written by a run
NORM_POLICIES: tuple[str, ...] = ("reject", "clip")  # trust.norm_policy (see hlora.trust)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _fail(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"invalid value for '{key}': {value!r} ({allowed})")


def _positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, value, "expected an integer >= 1")


def _non_negative_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "expected an integer >= 0")


def _number(
    key: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise _fail(key, value, f"expected a number in {left}{low}, {high}{right}")


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(key, value, f"allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class ModelConfig:
    """The backbone and its LoRA adapters."""

    name: str = field(
        default="minilm",
        metadata=_help(
            "backbone: 'minilm' (offline all-MiniLM-L6-v2), 'smollm2-135m' (offline SmolLM2-135M), "
            "a Hugging Face hub id (e.g. 'roberta-large') or a local folder"
        ),
    )
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "module names to adapt; empty: the architecture's default (query/value, q_proj/v_proj)"
        ),
    )
    lora_scaling: float = field(
        default=2.0,
        metadata=_help(
            "LoRA scaling s shared by every client whatever its rank (lora_alpha = s * r)"
        ),
    )
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    max_length: int = field(default=128, metadata=_help("truncate examples to this many tokens"))
    task_type: str = field(
        default=SEQ_CLS,
        metadata=_help(
            "'seq-cls': a classification head on the backbone; 'causal-lm': instruction tuning "
            "of a decoder (examples rendered as chat turns, loss on the answer tokens, "
            "evaluation by the answers' log-likelihood)"
        ),
    )

    quantization: str = field(
        default=NO_QUANTIZATION,
        metadata=_help(
            "'nf4': the frozen base loaded in 4-bit NormalFloat with double quantization and "
            "bf16 compute (QLoRA; needs a CUDA GPU and the bitsandbytes package; the adapters, "
            "the head and the aggregation stay in full precision); 'none': the base at full "
            "precision"
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _fail("model.name", self.name, "expected a non-empty string")
        _number("model.lora_scaling", self.lora_scaling, low=0.0, low_open=True)
        _number("model.lora_dropout", self.lora_dropout, low=0.0, high=0.9)
        _positive_int("model.max_length", self.max_length)
        _choice("model.task_type", self.task_type, TASK_TYPES)
        _choice("model.quantization", self.quantization, QUANTIZATIONS)
        if not all(isinstance(t, str) and t for t in self.target_modules):
            raise _fail(
                "model.target_modules", list(self.target_modules), "expected a list of module names"
            )


@dataclass(frozen=True)
class DataConfig:
    """The task and how it is split among clients."""

    task: str = field(
        default="mrpc",
        metadata=_help(
            f"one of {', '.join(TASK_NAMES)}; 'instructions': your own instruction data "
            "(train_file), with model.task_type = 'causal-lm'"
        ),
    )
    train_file: str = field(
        default="",
        metadata=_help(
            "task 'instructions': a .jsonl or .csv file of instruction examples (chat "
            "'messages', Alpaca-style instruction/input/output, or prompt/response), or "
            "'hub:NAME[:SPLIT]' for a Hugging Face dataset where the hub is reachable"
        ),
    )
    eval_file: str = field(
        default="",
        metadata=_help(
            "task 'instructions': held-out examples in the same form (empty: hold out "
            "validation_fraction of train_file)"
        ),
    )
    category_field: str = field(
        default="category",
        metadata=_help(
            "task 'instructions': the field naming each example's category (partitions "
            "'dirichlet' and 'category' split by it)"
        ),
    )
    system_prompt: str = field(
        default=SYSTEM_TEMPLATE,
        metadata=_help(
            "model.task_type 'causal-lm': the system turn of every example without one: "
            f"'{SYSTEM_TEMPLATE}' (what the chat template adds by itself; SmolLM2's adds its "
            f"default system prompt), '{SYSTEM_NONE}' (no system prompt), or the prompt's text"
        ),
    )
    data_dir: str = field(
        default="",
        metadata=_help(
            "folder in the GLUE TSV layout; empty: $HLORA_DATA_DIR, then the Hugging Face hub"
        ),
    )
    partition: str = field(
        default="dirichlet",
        metadata=_help(
            f"how examples are split among clients: {', '.join(ALL_PARTITION_SCHEMES)} "
            "('category': one category per client, for instruction data)"
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=_help(
            "Dirichlet concentration of the label (or quantity) skew; smaller = more skewed"
        ),
    )
    min_client_examples: int = field(
        default=8, metadata=_help("every client gets at least this many training examples")
    )
    train_limit: int = field(default=0, metadata=_help("use the first N train examples (0: all)"))
    dev_limit: int = field(default=0, metadata=_help("use the first N dev examples (0: all)"))
    validation_fraction: float = field(
        default=0.0,
        metadata=_help(
            "hold out this share of the training data (a fixed seeded draw, the same for every "
            "strategy and seed) and evaluate on it instead of dev: for choosing settings "
            "without looking at dev (0: train on all of it, evaluate on dev)"
        ),
    )

    def __post_init__(self) -> None:
        _choice("data.task", self.task, TASK_NAMES)
        _number("data.validation_fraction", self.validation_fraction, low=0.0, high=0.5)
        _choice("data.partition", self.partition, ALL_PARTITION_SCHEMES)
        if self.task == INSTRUCTIONS and not self.train_file:
            raise _fail("data.train_file", self.train_file, "task 'instructions' needs a file")
        if self.task != INSTRUCTIONS and (self.train_file or self.eval_file):
            raise _fail(
                "data.train_file" if self.train_file else "data.eval_file",
                self.train_file or self.eval_file,
                "only task 'instructions' reads files; GLUE tasks read data_dir",
            )
        if self.task == INSTRUCTIONS and not self.eval_file and self.validation_fraction <= 0:
            raise _fail(
                "data.eval_file",
                self.eval_file,
                "task 'instructions' needs held-out data: an eval_file or a validation_fraction",
            )
        if not isinstance(self.system_prompt, str):
            raise _fail("data.system_prompt", self.system_prompt, "expected a string")
        _number("data.alpha", self.alpha, low=0.0, low_open=True)
        _positive_int("data.min_client_examples", self.min_client_examples)
        _non_negative_int("data.train_limit", self.train_limit)
        _non_negative_int("data.dev_limit", self.dev_limit)


@dataclass(frozen=True)
class FederationConfig:
    """Clients, ranks, rounds and the aggregation strategy."""

    strategy: str = field(
        default="hlora",
        metadata=_help(f"aggregation strategy or reference mode: {', '.join(ALL_MODES)}"),
    )
    num_clients: int = field(default=10, metadata=_help("number of clients"))
    clients_per_round: int = field(
        default=0, metadata=_help("clients sampled each round (0: all take part)")
    )
    rounds: int = field(default=16, metadata=_help("federated rounds"))
    rank_rule: str = field(
        default="cycle",
        metadata=_help(
            "'cycle': client k gets ranks[k % len(ranks)]; 'list': one rank per client; "
            "'memory': the largest rank in ranks whose training footprint (base weights at their "
            "dtype + the activations of a batch of train.batch_size x model.max_length tokens, "
            "measured + weight, gradient and optimizer state per trained parameter (16 bytes "
            "under AdamW); "
            "hlora.memory) fits the client's memory_budgets_mb"
        ),
    )
    ranks: tuple[int, ...] = field(default=(2, 4, 8, 16), metadata=_help("LoRA ranks"))
    memory_budgets_mb: tuple[float, ...] = field(
        default=(),
        metadata=_help(
            "per-client training memory in MiB (rank_rule = 'memory'; the Python runtime "
            "not included), cycled over clients"
        ),
    )
    centralized_rank: int = field(
        default=0, metadata=_help("rank of the 'centralized' reference (0: the largest of ranks)")
    )
    min_clients: int = field(
        default=1,
        metadata=_help("a round needs at least this many valid updates, else the run stops"),
    )
    seed: int = field(default=0, metadata=_help("seed of partitions, sampling and training"))

    def __post_init__(self) -> None:
        _choice("federation.strategy", self.strategy, ALL_MODES)
        _positive_int("federation.num_clients", self.num_clients)
        _non_negative_int("federation.clients_per_round", self.clients_per_round)
        if self.clients_per_round > self.num_clients:
            raise _fail(
                "federation.clients_per_round",
                self.clients_per_round,
                f"at most federation.num_clients = {self.num_clients}",
            )
        _positive_int("federation.rounds", self.rounds)
        _choice("federation.rank_rule", self.rank_rule, RANK_RULES)
        if not self.ranks:
            raise _fail("federation.ranks", [], "expected at least one rank")
        for r in self.ranks:
            _positive_int("federation.ranks", r)
        if self.rank_rule == "list" and len(self.ranks) != self.num_clients:
            raise _fail(
                "federation.ranks",
                list(self.ranks),
                f"rank_rule 'list' needs one rank per client ({self.num_clients})",
            )
        if self.rank_rule == "memory":
            if not self.memory_budgets_mb:
                raise _fail(
                    "federation.memory_budgets_mb",
                    [],
                    "rank_rule 'memory' needs at least one budget",
                )
            for b in self.memory_budgets_mb:
                _number("federation.memory_budgets_mb", b, low=0.0, low_open=True)
        _non_negative_int("federation.centralized_rank", self.centralized_rank)
        _positive_int("federation.min_clients", self.min_clients)
        _non_negative_int("federation.seed", self.seed)
        if self.strategy == "fedavg" and len(set(self.ranks)) > 1:  # whatever the rank rule
            raise _fail(
                "federation.ranks",
                list(self.ranks),
                "strategy 'fedavg' needs one rank for every client",
            )


@dataclass(frozen=True)
class TrainConfig:
    """Local training of each client in each round."""

    local_epochs: float = field(
        default=1.0, metadata=_help("passes over the client's data per round (fractions allowed)")
    )
    local_steps: int = field(
        default=0,
        metadata=_help(
            "optimizer steps per round for every client, whatever its size, instead of "
            "local_epochs (0: local_epochs decides); equal steps keep a large client's update "
            "from outgrowing the others' (its weight n_k / n already counts its size)"
        ),
    )
    batch_size: int = field(default=16, metadata=_help("examples per step"))
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "the clients' optimizer: 'adamw' or 'sgd' (steps in proportion to the gradient, "
            "as in FedAvg and FedOpt; a client whose loss is already near zero barely moves)"
        ),
    )
    learning_rate: float = field(default=2e-3, metadata=_help("the clients' learning rate"))
    head_learning_rate: float = field(
        default=0.0,
        metadata=_help(
            "the trained head's learning rate, following the same schedule (0: the "
            "learning_rate); plain SGD needs a far larger rate for the LoRA factors than for "
            "the head"
        ),
    )
    freeze_head: bool = field(
        default=False,
        metadata=_help(
            "keep the classifier's head at its seeded initialisation for the whole run (as in "
            "FedBABU): clients train only the LoRA factors and the server keeps the head, so a "
            "label-skewed client cannot pull the shared head toward its own classes"
        ),
    )
    momentum: float = field(
        default=0.0, metadata=_help("SGD momentum (optimizer 'sgd' only; reset every round)")
    )
    adam_epsilon: float = field(
        default=_ADAM_EPSILON,
        metadata=_help(
            "AdamW's epsilon (optimizer 'adamw' only): a step is m / (sqrt(v) + epsilon), so a "
            "coordinate whose gradients are far below epsilon steps in proportion to them (as "
            "under SGD) and one far above steps about the learning rate"
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_help("weight decay (decoupled for AdamW)"))
    warmup_ratio: float = field(
        default=0.1,
        metadata=_help(
            "share of the steps with linear warm-up: of the whole run's (run-wide schedules) or "
            "of each round's (lr_schedule = 'round')"
        ),
    )
    lr_schedule: str = field(
        default="linear",
        metadata=_help(
            "'linear' or 'cosine': one warm-up, then decay to zero across the whole run (the "
            "server tells each client the stretch of the schedule its round covers); "
            "'constant': one warm-up, then flat; 'round': warm-up and linear decay inside "
            "every round"
        ),
    )
    proximal_mu: float = field(
        default=0.0,
        metadata=_help(
            "FedProx: add mu/2 * ||theta - theta_start||^2 over the trainable LoRA factors and "
            "head to each client's loss (0: off)"
        ),
    )
    logit_adjustment: float = field(
        default=1.0,
        metadata=_help(
            "logit adjustment for label skew: each client trains on logits + tau * (log of its "
            "own label distribution - log of the federation's), tau = this value; a client "
            "whose labels follow the federation's is unchanged; evaluation uses the plain "
            "logits (0: off)"
        ),
    )
    decorrelation: float = field(
        default=0.0,
        metadata=_help(
            "FedDecorr: add beta * the mean squared off-diagonal correlation between the "
            "dimensions of the features entering the classifier's last layer (over each "
            "batch) to each client's loss, beta = this value; proposed (Shi et al. 2023) "
            "against a label-skewed client's features collapsing onto the few directions its "
            "own classes need (sequence classifiers whose head reads one vector per example; "
            "0: off)"
        ),
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: off)"))
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "recompute activations in the backward pass instead of keeping them: less memory "
            "for long sequences, about a quarter slower (the same gradients)"
        ),
    )
    device: str = field(default="auto", metadata=_help("'auto', 'cpu' or 'cuda'"))
    precision: str = field(
        default="auto",
        metadata=_help(
            "matrix products in 'bf16' (autocast; weights, LoRA factors and optimizer state stay "
            "fp32) or 'fp32'; 'auto': bf16 on CUDA and on CPUs with native bf16 instructions "
            "(AVX512-BF16, AMX), else fp32"
        ),
    )

    @property
    def adapter_bytes_per_param(self) -> int:
        """Training bytes per trainable fp32 parameter: itself, its gradient, and the
        optimizer's state (two AdamW moments, one SGD momentum buffer, or none)."""
        moments = 2 if self.optimizer == "adamw" else (1 if self.momentum > 0 else 0)
        return 4 * (2 + moments)

    def __post_init__(self) -> None:
        _number("train.local_epochs", self.local_epochs, low=0.0, low_open=True)
        _non_negative_int("train.local_steps", self.local_steps)
        _positive_int("train.batch_size", self.batch_size)
        _choice("train.optimizer", self.optimizer, CLIENT_OPTIMIZERS)
        high = 1.0 if self.optimizer == "adamw" else 100.0
        _number("train.learning_rate", self.learning_rate, low=0.0, low_open=True, high=high)
        _number("train.head_learning_rate", self.head_learning_rate, low=0.0, high=high)
        if not isinstance(self.freeze_head, bool):
            raise _fail("train.freeze_head", self.freeze_head, "true or false")
        if self.freeze_head and self.head_learning_rate > 0:
            raise _fail(
                "train.head_learning_rate",
                self.head_learning_rate,
                "a frozen head (train.freeze_head = true) has no learning rate: use 0",
            )
        _number("train.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        if self.momentum > 0 and self.optimizer != "sgd":
            raise _fail("train.momentum", self.momentum, "only with train.optimizer = 'sgd'")
        _number("train.adam_epsilon", self.adam_epsilon, low=0.0, low_open=True, high=1.0)
        if self.adam_epsilon != _ADAM_EPSILON and self.optimizer != "adamw":
            raise _fail(
                "train.adam_epsilon", self.adam_epsilon, "only with train.optimizer = 'adamw'"
            )
        _number("train.weight_decay", self.weight_decay, low=0.0)
        _number("train.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _number("train.proximal_mu", self.proximal_mu, low=0.0)
        _number("train.logit_adjustment", self.logit_adjustment, low=0.0, high=10.0)
        _number("train.decorrelation", self.decorrelation, low=0.0, high=100.0)
        _number("train.max_grad_norm", self.max_grad_norm, low=0.0)
        if not isinstance(self.gradient_checkpointing, bool):
            raise _fail(
                "train.gradient_checkpointing", self.gradient_checkpointing, "true or false"
            )
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))


@dataclass(frozen=True)
class ServerConfig:
    """Server-side aggregation and evaluation."""

    global_rank: int = field(
        default=0,
        metadata=_help(
            "keep at most this many components of the global update (0: every exact one)"
        ),
    )
    svd_method: str = field(default="auto", metadata=_help(f"one of {', '.join(SVD_METHODS)}"))
    factor_split: str = field(
        default="balanced",
        metadata=_help(
            "where the global update's singular values sit in the factors a client starts "
            "from (hlora): balanced (B = U sqrt(S), A = sqrt(S) Vh) or orthonormal-a "
            "(B = U S, A = Vh, as LoRA starts a fresh adapter, so weak components keep "
            "learning); the product is the same"
        ),
    )
    eval_every: int = field(
        default=1,
        metadata=_help("evaluate the global model every N rounds (the last round always)"),
    )
    eval_truncations: str = field(
        default="every",
        metadata=_help(
            "also evaluate each client rank's truncation of the global update: "
            f"{', '.join(TRUNCATION_EVALS)}"
        ),
    )
    eval_batch_size: int = field(default=64, metadata=_help("examples per evaluation step"))
    optimizer: str = field(
        default="none",
        metadata=_help(
            "server optimizer on the pseudo-gradient (the weighted mean of the clients' progress "
            "in the round): 'none' (the global update is the aggregate, as in the paper), "
            "'sgd', 'avgm' (FedAvgM: heavy-ball momentum), 'adam' or 'yogi' (FedAdam/FedYogi, "
            "Reddi et al. 2021)"
        ),
    )
    learning_rate: float = field(default=1.0, metadata=_help("server learning rate eta"))
    lr_schedule: str = field(
        default="constant",
        metadata=_help(
            "how eta moves across rounds: 'constant', or 'linear' / 'cosine' (decay toward zero "
            "over the run, read at the middle of each round); either after a linear warm-up "
            "over server.warmup_ratio of the rounds"
        ),
    )
    warmup_ratio: float = field(
        default=0.0, metadata=_help("share of the rounds over which eta warms up from zero")
    )
    momentum: float = field(
        default=0.9, metadata=_help("momentum of 'avgm'; beta1 of 'adam' and 'yogi'")
    )
    beta2: float = field(default=0.99, metadata=_help("beta2 of 'adam' and 'yogi'"))
    epsilon: float = field(
        default=1e-3, metadata=_help("adaptivity tau of 'adam' and 'yogi' (added to sqrt(v))")
    )
    optimizer_state: str = field(
        default="auto",
        metadata=_help(
            "where the optimizer keeps each layer's state: 'dense' (out x in tensors), "
            "'factored' (low-rank, at most state_rank components; 'sgd' and 'avgm' only) or "
            "'auto' (dense up to 4M entries per layer, factored above; always dense for 'adam' "
            "and 'yogi')"
        ),
    )
    state_rank: int = field(
        default=64,
        metadata=_help("rank budget of factored optimizer state and of a factored global update"),
    )
    hlora_space: str = field(
        default="delta",
        metadata=_help(
            "where a server optimizer steps hlora's global update (the other strategies step "
            "their own factors or increment): 'delta' (each layer's whole update dW) or "
            "'server-factors' (the server keeps its own rank-R factors L, Rt of it, steps them "
            "along the round's exact progress pulled back to them, and sends each client the "
            "best rank-r_k part of L Rt; R = server.global_rank, or the largest client rank) "
            "or 'factor-steps' (the same factors, stepped along the clients' own factor steps "
            "read as gradients of L and Rt: naive averaging's server step, for every rank)"
        ),
    )

    residual: str = field(
        default="drop",
        metadata=_help(
            "what a client of rank r_k holds of the global update's components beyond r_k: "
            "'drop' (nothing: it trains and uses the best rank-r_k part, the paper's rule) or "
            "'frozen' (they are added to its frozen base weights, so every client trains at "
            "the global model and only its own r_k components move; it receives them as "
            "factors; needs a server.optimizer, whose step keeps them in the global update)"
        ),
    )

    window: str = field(
        default="leading",
        metadata=_help(
            "which of the global update's components a client of rank r_k trains under "
            "server.residual = 'frozen': 'leading' (its best rank-r_k part) or 'rolling' (in "
            "round t the components t, t+1, ..., t+r_k-1 modulo the update's rank, so that "
            "every component is trained by every client in turn, as FedRolex rolls its "
            "sub-models; hlora only)"
        ),
    )

    head_calibration: str = field(
        default="none",
        metadata=_help(
            "after the last round: 'none', or 'ccvr' (every client sends the per-class mean and "
            "covariance of the features entering the classifier's last layer under the final "
            "model; the server refits that layer on features sampled from them; "
            "hlora/calibration.py)"
        ),
    )
    calibration_samples: float = field(
        default=10.0,
        metadata=_help("virtual features 'ccvr' samples per training example (0.1 to 100)"),
    )

    def __post_init__(self) -> None:
        _choice("server.head_calibration", self.head_calibration, HEAD_CALIBRATIONS)
        _number("server.calibration_samples", self.calibration_samples, low=0.1, high=100.0)
        _choice("server.optimizer", self.optimizer, SERVER_OPTIMIZERS)
        _number("server.learning_rate", self.learning_rate, low=0.0, low_open=True, high=100.0)
        _choice("server.lr_schedule", self.lr_schedule, RUN_SCHEDULES)
        _number("server.warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        unscheduled = "a schedule of the server's learning rate needs a server.optimizer"
        if self.optimizer == "none" and self.lr_schedule != "constant":
            raise _fail("server.lr_schedule", self.lr_schedule, unscheduled)
        if self.optimizer == "none" and self.warmup_ratio > 0:
            raise _fail("server.warmup_ratio", self.warmup_ratio, unscheduled)
        _number("server.momentum", self.momentum, low=0.0, high=0.999)
        _number("server.beta2", self.beta2, low=0.0, high=0.99999)
        _number("server.epsilon", self.epsilon, low=0.0, low_open=True, high=1.0)
        _choice("server.optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        _positive_int("server.state_rank", self.state_rank)
        if self.optimizer_state == "factored" and self.optimizer in ("adam", "yogi"):
            raise _fail(
                "server.optimizer_state",
                self.optimizer_state,
                f"server.optimizer '{self.optimizer}' needs 'dense' or 'auto' state (its second "
                "moment is elementwise; factored state is for 'sgd' and 'avgm')",
            )
        _choice("server.hlora_space", self.hlora_space, HLORA_SPACES)
        if self.hlora_space != "delta" and self.optimizer == "none":
            raise _fail("server.hlora_space", self.hlora_space, "it needs a server.optimizer")
        if self.hlora_space != "delta" and self.optimizer_state == "factored":
            raise _fail(
                "server.optimizer_state",
                self.optimizer_state,
                f"'{self.hlora_space}' keeps its state at the factors' shapes: use 'auto' or "
                "'dense'",
            )
        _choice("server.residual", self.residual, RESIDUALS)
        if self.residual != "drop" and self.optimizer == "none":
            raise _fail(
                "server.residual",
                self.residual,
                "it needs a server.optimizer: without one the new global update is the "
                "aggregate of the trained factors, which would drop what the clients held "
                "frozen (server.optimizer = 'sgd' at learning_rate 1 is the aggregate with "
                "nothing dropped)",
            )
        _choice("server.window", self.window, WINDOWS)
        if self.window != "leading" and self.residual != "frozen":
            raise _fail(
                "server.window",
                self.window,
                "it needs server.residual = 'frozen': a client that drops the components "
                "beyond its window would hold the update without its leading components",
            )
        _non_negative_int("server.global_rank", self.global_rank)
        _choice("server.svd_method", self.svd_method, SVD_METHODS)
        _choice("server.factor_split", self.factor_split, FACTOR_SPLITS)
        _positive_int("server.eval_every", self.eval_every)
        _choice("server.eval_truncations", self.eval_truncations, TRUNCATION_EVALS)
        _positive_int("server.eval_batch_size", self.eval_batch_size)


@dataclass(frozen=True)
class TrustConfig:
    """What the server accepts from clients (see hlora.trust); every engine applies it."""

    max_client_examples: int = field(
        default=0,
        metadata=_help(
            "cap on the example count a client's aggregation weight is computed from "
            "(0: no cap); the count itself is the one the server accepted when the client joined"
        ),
    )
    update_norm_bound: float = field(
        default=0.0,
        metadata=_help(
            "bound on each client update's Frobenius norm sqrt(sum over layers of "
            "||s B A||_F^2), computed from the r x r Gram products (0: no bound)"
        ),
    )
    norm_policy: str = field(
        default="reject",
        metadata=_help(
            "what a larger update gets: 'reject' (dropped for the round with its norm) or "
            "'clip' (both factors scaled by sqrt(bound / norm), so s B A lands on the bound)"
        ),
    )

    def __post_init__(self) -> None:
        _non_negative_int("trust.max_client_examples", self.max_client_examples)
        _number("trust.update_norm_bound", self.update_norm_bound, low=0.0)
        _choice("trust.norm_policy", self.norm_policy, NORM_POLICIES)


@dataclass(frozen=True)
class OutputConfig:
    """Where the run folder goes."""

    dir: str = field(default="runs", metadata=_help("parent folder of run folders"))
    name: str = field(default="", metadata=_help("run folder name (empty: task-strategy-time)"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))

    def __post_init__(self) -> None:
        if not isinstance(self.dir, str) or not self.dir:
            raise _fail("output.dir", self.dir, "expected a non-empty path")


@dataclass(frozen=True)
class RunConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.data.task == INSTRUCTIONS and self.model.task_type != CAUSAL_LM:
            raise _fail(
                "model.task_type",
                self.model.task_type,
                "task 'instructions' trains a causal LM: use 'causal-lm'",
            )
        if self.data.system_prompt != SYSTEM_TEMPLATE and self.model.task_type != CAUSAL_LM:
            raise _fail(
                "data.system_prompt",
                self.data.system_prompt,
                "only a causal LM ('causal-lm') reads prompts; a classifier has none",
            )
        if self.server.head_calibration != "none":
            if self.model.task_type != SEQ_CLS:
                raise _fail(
                    "server.head_calibration",
                    self.server.head_calibration,
                    "only a sequence classifier ('seq-cls') has a head to calibrate",
                )
            if self.federation.strategy == "local":
                raise _fail(
                    "server.head_calibration",
                    self.server.head_calibration,
                    "the 'local' reference has no global model whose head could be calibrated",
                )
        if self.train.decorrelation > 0 and self.model.task_type != SEQ_CLS:
            raise _fail(
                "train.decorrelation",
                self.train.decorrelation,
                "only a sequence classifier ('seq-cls') has the head features it decorrelates",
            )
        if self.train.freeze_head and self.model.task_type != SEQ_CLS:
            raise _fail(
                "train.freeze_head",
                self.train.freeze_head,
                "only a sequence classifier ('seq-cls') trains a head; a causal LM's output "
                "layer is always frozen",
            )
        if self.server.residual != "drop" and self.federation.strategy == "flora":
            raise _fail(
                "server.residual",
                self.server.residual,
                "strategy 'flora' merges the whole update into the base weights already",
            )
        if self.server.window != "leading" and self.federation.strategy != "hlora":
            raise _fail(
                "server.window",
                self.server.window,
                "only 'hlora' re-sorts its global update by SVD every round; the other "
                "strategies' optimizer state is tied to their columns' order",
            )
        if self.model.quantization != NO_QUANTIZATION:
            if self.server.residual != "drop":
                raise _fail(
                    "server.residual",
                    self.server.residual,
                    "a 4-bit base cannot take the components added to it: use 'drop'",
                )
            if self.federation.strategy == "flora":
                raise _fail(
                    "model.quantization",
                    self.model.quantization,
                    "strategy 'flora' merges every round's update into the base weights, which "
                    "a 4-bit base cannot take: use 'none', or another strategy",
                )
            if self.train.device == "cpu":
                raise _fail(
                    "model.quantization",
                    self.model.quantization,
                    "a 4-bit base needs a CUDA GPU (bitsandbytes' kernels), and train.device is "
                    "'cpu': use 'none' on a CPU",
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for TOML/JSON."""

        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {
            section.name: {
                f.name: plain(getattr(getattr(self, section.name), f.name))
                for f in fields(getattr(self, section.name))
            }
            for section in fields(self)
        }


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]


def _coerce(section: type, key: str, value: Any) -> Any:
    """Turn TOML lists into tuples for tuple fields."""
    annotations = {f.name: str(f.type) for f in fields(section)}
    if annotations[key].startswith("tuple") and isinstance(value, list):
        return tuple(value)
    return value


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested mappings, rejecting unknown keys.

    Raises:
        ConfigError: Unknown section or key, or a bad value.
    """
    sections = _section_types()
    built: dict[str, Any] = {}
    for name, body in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' (allowed: {', '.join(sections)})")
        if not isinstance(body, Mapping):
            raise ConfigError(f"config section '{name}' must be a table, got {body!r}")
        cls = sections[name]
        allowed = [f.name for f in fields(cls)]
        unknown = [k for k in body if k not in allowed]
        if unknown:
            raise ConfigError(
                f"unknown config key '{name}.{unknown[0]}' (allowed in [{name}]: "
                f"{', '.join(allowed)})"
            )
        try:
            built[name] = cls(**{k: _coerce(cls, k, v) for k, v in body.items()})
        except TypeError as err:  # e.g. a list where a scalar belongs
            raise ConfigError(f"invalid config section '{name}': {err}") from err
    return RunConfig(**built)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse one ``--set section.key=value`` (value in TOML syntax, bare words as strings).

    Raises:
        ConfigError: When the text is not ``section.key=value``.
    """
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"invalid --set '{text}': expected section.key=value")
    path, raw_value = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML file (or the defaults), apply ``--set`` overrides, validate.

    Args:
        path: A TOML file with any of the sections ``model``, ``data``, ``federation``,
            ``train``, ``server``, ``trust``, ``output``; None for the defaults.
        overrides: ``section.key=value`` strings, applied after the file.

    Raises:
        ConfigError: Missing/unreadable file, bad TOML, unknown key or bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file '{p}' is not valid TOML: {err}") from err
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section '{section}' must be a table")
        raw[section][key] = value
    return config_from_dict(raw)


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run folder holds (its ``config.toml``, as the run wrote it).

    Raises:
        CheckpointError: ``run_dir`` is not a run folder (no ``config.toml``).
        ConfigError: A ``config.toml`` that is no longer a valid configuration.
    """
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run folder: '{config_path}' is missing")
    return load_config(config_path)


def replace(config: RunConfig, **sections: Mapping[str, Any]) -> RunConfig:
    """A copy of ``config`` with some fields of some sections changed (validated again)."""
    changed = {
        name: dataclasses.replace(getattr(config, name), **values)
        for name, values in sections.items()
    }
    return dataclasses.replace(config, **changed)


def to_toml(config: RunConfig) -> str:
    """Serialize a config as TOML (the resolved config written into each run folder)."""
    lines: list[str] = []
    for section, body in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _added_later() -> dict[str, dict[str, Any]]:
    """Settings added after run folders existed, each at the value that means "as before"."""
    return {
        "model": {"task_type": SEQ_CLS, "quantization": NO_QUANTIZATION},
        "data": {
            "train_file": "",
            "eval_file": "",
            "category_field": "category",
            "system_prompt": SYSTEM_TEMPLATE,
        },
        "train": {
            "gradient_checkpointing": False,
            "local_steps": 0,
            "optimizer": "adamw",
            "head_learning_rate": 0.0,
            "freeze_head": False,
            "momentum": 0.0,
            "adam_epsilon": _ADAM_EPSILON,
            "decorrelation": 0.0,
        },
        "server": {
            "factor_split": "balanced",
            "head_calibration": "none",
            "calibration_samples": 10.0,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "hlora_space": "delta",
            "residual": "drop",
            "window": "leading",
        },
        "trust": dataclasses.asdict(TrustConfig()),
    }


def fingerprint(config: RunConfig) -> str:
    """Hash of everything that changes results (the output section is left out).

    A setting added after run folders existed counts only when it differs from its "as before"
    value (:func:`_added_later`), so the checkpoints written before it still resume; a section
    left empty that way is dropped.
    """
    body = config.to_dict()
    body.pop("output", None)
    for section, defaults in _added_later().items():
        values = body.get(section, {})
        for key, default in defaults.items():
            if key in values and values[key] == default:
                del values[key]
        if section in body and not values:
            del body[section]
    return hashlib.sha256(repr(sorted(body.items())).encode()).hexdigest()[:16]
