"""What travels between the server's round loop and the clients, whatever the engine.

The round loop (:mod:`hlora.server`) is written once against :class:`Transport`; the in-process
engine and the Flower engine implement it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from hlora.aggregation import ClientUpdate, LoraFactors, LowRankDelta
from hlora.calibration import ClassMoments
from hlora.metrics import EvalCounts
from hlora.schedule import RoundSchedule


@dataclass(frozen=True)
class TrainInstruction:
    """What the server sends one client for one round.

    Attributes:
        client_id: The client.
        round_num: The round, from 1.
        rank: The client's LoRA rank.
        scaling: The LoRA scaling ``s`` (shared by every rank).
        factors: Starting factors at ``rank``; None: a fresh LoRA init from ``init_seed``.
        extras: Starting head (other trainable tensors).
        init_seed: Seed of the fresh LoRA init (used when ``factors`` is None).
        train_seed: Seed of this client's data order and dropout in this round.
        base_version: Number of merged updates the frozen base must carry (``flora``); with
            ``server.residual = "frozen"`` a negative tag of the round and rank.
        base_delta: The cumulative merged update relative to the pretrained weights, per layer
            (``flora``), or the global update's components beyond ``rank`` (``server.residual
            = "frozen"``); None when the base stays the pretrained model.
        schedule: This round's stretch of the run-wide learning-rate schedule (see
            :mod:`hlora.schedule`); None: the client's own warm-up and decay inside the round.
        label_prior: The federation's label distribution ``(num_labels,)``, for the logit
            adjustment (``train.logit_adjustment``); None: no adjustment.
    """

    client_id: str
    round_num: int
    rank: int
    scaling: float
    factors: Mapping[str, LoraFactors] | None
    extras: Mapping[str, Tensor]
    init_seed: int
    train_seed: int
    base_version: int = 0
    base_delta: Mapping[str, LowRankDelta] | None = None
    schedule: RoundSchedule | None = None
    label_prior: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainReply:
    """A client's answer: its update and how training went."""

    update: ClientUpdate
    loss: float
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalInstruction:
    """What the server sends a node to evaluate the global model on the node's held-out data
    (a federated evaluation): the model ``W0 + base_delta + layers`` with head ``extras``.

    Attributes:
        client_id: The node's client.
        round_num: The round just finished.
        layers: The global update per layer, ``dW = scale * left @ right`` (``left (out, k)``,
            ``right (k, in)``); empty for ``flora``, whose update lives in ``base_delta``.
        extras: The global head.
        base_version: Number of merged updates in ``base_delta`` (``flora``).
        base_delta: The cumulative merged update (``flora``), or None.
    """

    client_id: str
    round_num: int
    layers: Mapping[str, LowRankDelta]
    extras: Mapping[str, Tensor]
    base_version: int = 0
    base_delta: Mapping[str, LowRankDelta] | None = None


@dataclass(frozen=True)
class EvalReply:
    """A node's federated evaluation: what adds up over nodes, not its metrics.

    Attributes:
        client_id: The node's client.
        num_examples: Its held-out examples.
        counts: Confusion counts and loss sums (:class:`hlora.metrics.EvalCounts`).
        seconds: Time the evaluation took on the node.
    """

    client_id: str
    num_examples: int
    counts: EvalCounts
    seconds: float


@dataclass(frozen=True)
class MomentsReply:
    """A client's per-class feature moments under the final global model, for the head's
    calibration (``server.head_calibration``; :mod:`hlora.calibration`).

    Attributes:
        client_id: The client.
        moments: Its class counts ``(C,)``, means ``(C, d)`` and covariances ``(C, d, d)`` of
            the features entering the head's final linear layer, on its training examples.
        seconds: Time the pass took on the client.
    """

    client_id: str
    moments: ClassMoments
    seconds: float


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not deliver an update this round (error, timeout, disconnect)."""

    client_id: str
    reason: str


@dataclass(frozen=True)
class RoundResult:
    """Everything the transport collected for one round."""

    replies: Sequence[TrainReply]
    failures: Sequence[ClientFailure] = field(default_factory=tuple)


class Transport(Protocol):
    """Sends each client its instruction and collects the replies of one round."""

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult: ...


class EvaluatingTransport(Transport, Protocol):
    """A transport whose clients also evaluate the global model on their own held-out data."""

    def evaluate_round(
        self, instructions: Sequence[EvalInstruction]
    ) -> tuple[list[EvalReply], list[ClientFailure]]:
        """Each node's evaluation, and a failure (with its reason) for each that gave none."""
        ...


class CalibratingTransport(Transport, Protocol):
    """A transport whose clients also report their feature moments for the head's calibration."""

    def feature_moments(
        self, instructions: Sequence[EvalInstruction]
    ) -> tuple[list[MomentsReply], list[ClientFailure]]:
        """Each client's moments under the instruction's model (its training examples), and a
        failure (with its reason) for each that gave none."""
        ...


def tensor_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' payload (``numel * element_size``)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def instruction_bytes(instruction: TrainInstruction) -> int:
    """Payload a server sends for one instruction (factors, head, and a flora base delta)."""
    total = tensor_bytes(instruction.extras)
    if instruction.factors is not None:
        total += sum(tensor_bytes({"A": f.A, "B": f.B}) for f in instruction.factors.values())
    if instruction.base_delta is not None:
        total += sum(
            tensor_bytes({"l": d.left, "r": d.right}) for d in instruction.base_delta.values()
        )
    return total


def update_bytes(update: ClientUpdate) -> int:
    """Payload a client sends back (its factors and head)."""
    factors = sum(tensor_bytes({"A": f.A, "B": f.B}) for f in update.factors.values())
    return factors + tensor_bytes(dict(update.extras))
