"""One process's model: a frozen backbone with its LoRA bank, training and evaluation.

In simulation a single :class:`ModelRuntime` serves every client (only adapter weights are
swapped, so memory does not grow with the number of clients); a Flower node holds one for its
own client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from hlora.adapters import LoraBank
from hlora.aggregation import ClientUpdate, LoraFactors, LowRankDelta
from hlora.calibration import ClassMoments
from hlora.config import TrainConfig
from hlora.data.collate import length_grouped_batches
from hlora.errors import ModelError
from hlora.metrics import EvalCounts, metrics_of
from hlora.objectives import BatchScore, Objective
from hlora.protocol import TrainInstruction, TrainReply

logger = logging.getLogger(__name__)

Features = Sequence[dict[str, Any]]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def label_log_prior(labels: Sequence[int], num_labels: int) -> Tensor:
    """``log`` of a client's label distribution, Laplace-smoothed, shape ``(num_labels,)``.

    Raises:
        ValueError: A label outside ``[0, num_labels)``.
    """
    counts = torch.ones(num_labels, dtype=torch.float64)
    for label in labels:
        if not 0 <= label < num_labels:
            raise ValueError(f"label {label} outside [0, {num_labels})")
        counts[label] += 1
    return (counts / counts.sum()).log().float()


def proximal_term(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> Tensor:
    """``sum ||p - a||^2`` over the trainable tensors (FedProx's term without ``mu / 2``)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))  # type: ignore[return-value]


_ONE_VECTOR_HEAD = (
    "the head's features (server.head_calibration, train.decorrelation) need a head that reads "
    "one feature vector per example (BERT- or RoBERTa-style classifiers); this model's head "
    "reads every position"
)


def decorrelation_penalty(features: Tensor, eps: float = 1e-5) -> Tensor:
    """FedDecorr's regularizer: the mean squared off-diagonal entry of the correlation matrix
    of ``features`` ``(batch, d)`` over the batch (0 when the ``d`` dimensions are pairwise
    uncorrelated, 1 when all of them move together).

    Each dimension is centred and divided by ``sqrt(var + eps * mean(var))`` over the batch
    (so the result does not depend on the features' overall scale, and a dimension far
    quieter than the others, or constant, counts little), ``K = Z^T Z / batch`` ``(d, d)`` is
    their correlation matrix, and the result is ``sum_{i != j} K_ij^2 / (d (d - 1))``: Shi et
    al.'s ``||K||_F^2 / d^2`` without its constant diagonal. A batch of one example has no
    correlations: 0.
    """
    n, d = features.shape
    if n < 2 or d < 2:
        return features.sum() * 0.0
    x = features.float()
    var = x.var(0, unbiased=False)  # (d,)
    z = (x - x.mean(0)) / (var + eps * var.mean().detach() + 1e-30).sqrt()
    k = z.T @ z / n  # (d, d)
    off = (k * k).sum() - (k.diagonal() ** 2).sum()
    return off / (d * (d - 1))


def client_optimizer(
    factors: Sequence[Tensor], head: Sequence[Tensor], cfg: TrainConfig, *, fused: bool = False
) -> torch.optim.Optimizer:
    """The client's optimizer for one round (``train.optimizer``).

    ``adamw``: steps of about the learning rate per coordinate whatever the gradient's size,
    for gradients well above ``train.adam_epsilon`` (below it, in proportion to them).
    ``sgd``: steps in proportion to the gradient (with ``train.momentum``), as FedAvg and FedOpt
    assume: a client whose loss is already near zero (a one-class client under the logit
    adjustment) barely moves. The head learns at ``train.head_learning_rate`` when set, as a
    second parameter group. Every group carries ``"ratio"``, its rate over the learning rate,
    which a schedule keeps (``group["lr"] = rate * group["ratio"]``).
    ``fused``: AdamW's fused CUDA kernel.

    Args:
        factors: The LoRA factors ``A (r, in)`` and ``B (out, r)`` of every adapted layer.
        head: The trained head's tensors.
        cfg: The training settings.
        fused: Whether to use AdamW's fused kernel.
    """
    groups: list[dict[str, Any]]
    if cfg.head_learning_rate > 0:
        ratio = cfg.head_learning_rate / cfg.learning_rate
        groups = [
            {"params": list(factors), "ratio": 1.0},
            {"params": list(head), "lr": cfg.head_learning_rate, "ratio": ratio},
        ]
    else:
        groups = [{"params": [*factors, *head], "ratio": 1.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an op private to PyTorch: absent means no
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16 (see ``TrainConfig.precision``)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


class ModelRuntime:
    """Trains and evaluates on one shared frozen model.

    Args:
        bank: The LoRA bank (one adapter slot per rank) on the backbone.
        objective: The task type's batches, loss and scoring.
        train: Local training settings.
        device: Where the model runs.
    """

    def __init__(
        self,
        bank: LoraBank,
        objective: Objective,
        train: TrainConfig,
        device: torch.device,
    ) -> None:
        self.bank = bank
        self.objective = objective
        self.train_config = train
        self.device = device
        if not bank.quantized:  # a 4-bit model was loaded on its device, and cannot move
            bank.model.to(device)
        # Pretrained weights of the adapted layers, (out, in) each, for exact base resets:
        # copied when the base first changes (flora merges), so other strategies hold no copy.
        self._pretrained: dict[str, Tensor] | None = None
        self._base_version = 0
        self.bf16 = use_bf16(train.precision, device)

    # -- the frozen base (flora merges) -------------------------------------------------

    def sync_base(self, version: int, delta: Mapping[str, LowRankDelta] | None) -> None:
        """Make the frozen base ``W0 + delta`` (``delta`` None: ``W0``), tagged ``version``."""
        if version == self._base_version:
            return
        if self._pretrained is None:  # the base has been W0 until now
            self._pretrained = {
                n: self.bank.base_weight(n).clone() for n in self.bank.layer_names()
            }
        with torch.no_grad():
            for name, w0 in self._pretrained.items():
                weight = self.bank.base_weight(name)
                if delta is None or name not in delta:
                    weight.copy_(w0)
                else:
                    d = delta[name].dense().to(device=w0.device, dtype=torch.float32)
                    weight.copy_((w0.float() + d).to(w0.dtype))
        self._base_version = version

    # -- training ------------------------------------------------------------------------

    def train_client(self, instruction: TrainInstruction, features: Features) -> TrainReply:
        """Local training of one client (see :class:`TrainConfig`).

        AdamW or SGD (:func:`client_optimizer`) over the active adapter's factors and head (the
        factors alone with ``train.freeze_head``); a fresh optimizer every round; the learning
        rate follows ``instruction.schedule`` (the run-wide schedule) or, when None, a linear
        warm-up and decay inside the round; optional FedProx term, logit adjustment and
        FedDecorr penalty (:func:`decorrelation_penalty`; see :class:`TrainConfig`); gradient
        clipping, length-grouped batches with dynamic padding, bf16 autocast per
        ``train.precision``. Data order and dropout are seeded by ``instruction.train_seed``.

        Returns:
            The client's update (factors ``A (r, in)``, ``B (out, r)`` and head) and its mean
            training loss (without the penalties).

        Raises:
            ModelError: ``train.decorrelation`` on a head that reads every position.
        """
        start = time.perf_counter()
        cfg = self.train_config
        rank = instruction.rank
        bank = self.bank
        self.sync_base(instruction.base_version, instruction.base_delta)
        bank.activate(rank)
        if instruction.factors is None:
            bank.set_factors(rank, bank.init_factors(rank, instruction.init_seed))
        else:
            bank.set_factors(rank, {n: (f.A, f.B) for n, f in instruction.factors.items()})
        bank.set_extras(rank, instruction.extras)
        factor_params, head_params = bank.parameter_groups(rank)
        if cfg.freeze_head:  # the head goes back as it came (the server keeps its own)
            for param in head_params:
                param.requires_grad_(False)
            head_params = []
        params = factor_params + head_params
        optimizer = client_optimizer(
            factor_params, head_params, cfg, fused=self.device.type == "cuda"
        )
        objective = self.objective
        lengths = [objective.length(f) for f in features]
        batches_per_epoch = math.ceil(len(features) / cfg.batch_size)
        total_steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * batches_per_epoch))
        scheduler = None
        if instruction.schedule is None:  # warm-up and decay inside the round
            scheduler = get_linear_schedule_with_warmup(
                optimizer, int(cfg.warmup_ratio * total_steps), total_steps
            )
        anchors = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else []
        log_prior = None
        if cfg.logit_adjustment > 0 and instruction.label_prior is not None:
            own = label_log_prior(
                [objective.label(f) for f in features], len(instruction.label_prior)
            )
            federation = torch.tensor(instruction.label_prior, dtype=torch.float64).log().float()
            log_prior = (cfg.logit_adjustment * (own - federation)).to(self.device)
        captured: list[Tensor] = []  # the head's input features of the step (decorrelation)
        hook = None
        if cfg.decorrelation > 0:

            def capture(_module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
                captured.append(args[0])

            hook = bank.head_linear(rank)[1].register_forward_pre_hook(capture)
        torch.manual_seed(instruction.train_seed)
        model = bank.model
        model.train()
        losses: list[float] = []
        step = 0
        epoch = 0
        try:
            while step < total_steps:
                order = length_grouped_batches(
                    lengths, cfg.batch_size, shuffle=True, seed=instruction.train_seed + epoch
                )
                for batch_idx in order:
                    if step >= total_steps:
                        break
                    if instruction.schedule is not None:
                        lr = instruction.schedule.rate(step, total_steps)
                        for group in optimizer.param_groups:
                            group["lr"] = lr * group["ratio"]
                    batch = self.batch([features[i] for i in batch_idx])
                    with self.autocast():
                        loss = objective.loss(model, batch, log_prior)
                    total = loss
                    if anchors:
                        total = loss + 0.5 * cfg.proximal_mu * proximal_term(params, anchors)
                    if hook is not None:
                        if len(captured) != 1 or captured[0].dim() != 2:
                            raise ModelError(_ONE_VECTOR_HEAD)
                        total = total + cfg.decorrelation * decorrelation_penalty(captured[0])
                        captured.clear()
                    total.backward()
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    step += 1
                epoch += 1
        finally:
            if hook is not None:
                hook.remove()
            optimizer.zero_grad(set_to_none=True)
            model.eval()
        factors = {
            n: LoraFactors(A=a.cpu(), B=b.cpu()) for n, (a, b) in bank.get_factors(rank).items()
        }
        extras = {n: t.cpu() for n, t in bank.get_extras(rank).items()}
        update = ClientUpdate(
            client_id=instruction.client_id,
            num_examples=len(features),
            rank=rank,
            scaling=instruction.scaling,
            factors=factors,
            extras=extras,
        )
        mean_loss = sum(losses) / len(losses) if losses else math.nan
        return TrainReply(update, mean_loss, step, time.perf_counter() - start)

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(
        self,
        deltas: Mapping[str, LowRankDelta],
        extras: Mapping[str, Tensor],
        features: Features,
        metric_names: Sequence[str],
        batch_size: int,
        *,
        base_version: int = 0,
        base_delta: Mapping[str, LowRankDelta] | None = None,
    ) -> dict[str, float]:
        """Metrics of the model ``W0 + base_delta + deltas`` with head ``extras``.

        Args:
            deltas: Layer name -> update on top of the base, in factored form (merged
                densely into a full-precision base, applied factored to a 4-bit one:
                :meth:`hlora.adapters.LoraBank.evaluating`).
            extras: The head.
            features: Tokenized evaluation examples (with ``labels``).
            metric_names: E.g. ``("accuracy", "f1")``.
            batch_size: Examples per forward pass.
            base_version: Version tag of ``base_delta`` (see :meth:`sync_base`).
            base_delta: Cumulative merged update of the base (flora), or None.

        Returns:
            The label metrics among ``metric_names`` (accuracy, F1), the mean ``loss``
            (:meth:`Objective.score`) and, when asked, ``perplexity`` = ``exp(loss)``.
        """
        counts = self.evaluation_counts(
            deltas, extras, features, batch_size, base_version=base_version, base_delta=base_delta
        )
        return metrics_of(counts, metric_names)

    def evaluation_counts(
        self,
        deltas: Mapping[str, LowRankDelta],
        extras: Mapping[str, Tensor],
        features: Features,
        batch_size: int,
        *,
        base_version: int = 0,
        base_delta: Mapping[str, LowRankDelta] | None = None,
    ) -> EvalCounts:
        """The confusion counts and loss sums of ``W0 + base_delta + deltas`` with head
        ``extras`` on ``features`` (arguments as :meth:`evaluate`); what a node sends back in a
        federated evaluation."""
        preds: list[int] = []
        labels: list[int] = []
        total_loss = 0.0
        count = 0
        for _, scored in self._scored_batches(
            deltas, extras, features, batch_size, base_version, base_delta
        ):
            total_loss += scored.loss_sum
            count += scored.loss_count
            preds.extend(scored.preds)
            labels.extend(scored.labels)
        return EvalCounts.of(preds, labels, self.objective.task.num_labels, total_loss, count)

    def _scored_batches(
        self,
        deltas: Mapping[str, LowRankDelta],
        extras: Mapping[str, Tensor],
        features: Features,
        batch_size: int,
        base_version: int,
        base_delta: Mapping[str, LowRankDelta] | None,
    ) -> Iterator[tuple[list[int], BatchScore]]:
        """Each length-grouped batch of ``features`` (its indices) scored by the model ``W0 +
        base_delta + deltas`` with head ``extras``, without gradients (consume it whole: the
        model holds the update until the last batch)."""
        self.sync_base(base_version, base_delta)
        lengths = [self.objective.length(f) for f in features]
        order = length_grouped_batches(lengths, batch_size, shuffle=False, seed=0)
        with self.bank.evaluating(deltas, extras) as model, torch.no_grad():
            for batch_idx in order:
                batch = self.batch([features[i] for i in batch_idx])
                with self.autocast():
                    scored = self.objective.score(model, batch)
                yield batch_idx, scored

    def feature_moments(
        self,
        deltas: Mapping[str, LowRankDelta],
        extras: Mapping[str, Tensor],
        features: Features,
        batch_size: int,
        *,
        base_version: int = 0,
        base_delta: Mapping[str, LowRankDelta] | None = None,
    ) -> ClassMoments:
        """Per-class moments of :meth:`head_features`: what a client sends for the head's
        calibration (:mod:`hlora.calibration`). Arguments as :meth:`head_features`."""
        rows, labels = self.head_features(
            deltas, extras, features, batch_size, base_version=base_version, base_delta=base_delta
        )
        return ClassMoments.of(rows, labels, self.objective.task.num_labels)

    def head_features(
        self,
        deltas: Mapping[str, LowRankDelta],
        extras: Mapping[str, Tensor],
        features: Features,
        batch_size: int,
        *,
        base_version: int = 0,
        base_delta: Mapping[str, LowRankDelta] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The features entering the head's final linear layer
        (:meth:`hlora.adapters.LoraBank.head_linear`) under the model ``W0 + base_delta +
        deltas`` with head ``extras`` (arguments as :meth:`evaluate`), for each of ``features``.

        Returns:
            Features ``(n, d)`` float32 and labels ``(n,)`` int64, in length-grouped order.

        Raises:
            ModelError: A model without a linear head, or one whose head reads more than one
                feature vector per example (a decoder's score layer reads every position).
        """
        _, linear = self.bank.head_linear()
        rows: list[Tensor] = []
        labels: list[int] = []

        def capture(_module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            rows.append(args[0].detach().float().cpu())

        handle = linear.register_forward_pre_hook(capture)
        try:
            for batch_idx, _ in self._scored_batches(
                deltas, extras, features, batch_size, base_version, base_delta
            ):
                labels.extend(self.objective.label(features[i]) for i in batch_idx)
        finally:
            handle.remove()
        if any(r.dim() != 2 for r in rows):
            raise ModelError(_ONE_VECTOR_HEAD)
        stacked = torch.cat(rows) if rows else torch.zeros(0, linear.in_features)
        return stacked, torch.tensor(labels, dtype=torch.long)

    def batch(self, features: Features) -> dict[str, Tensor]:
        """Collated ``features`` on this runtime's device."""
        batch = self.objective.collate(features)
        return {k: v.to(self.device) for k, v in batch.items()}

    def autocast(self) -> Any:
        """bf16 autocast when ``train.precision`` asks for it on this device, else nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()
