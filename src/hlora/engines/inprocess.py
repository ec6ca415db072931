"""The in-process engine: every client trains in this process on one shared model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from hlora.errors import HloraError
from hlora.protocol import (
    ClientFailure,
    EvalInstruction,
    MomentsReply,
    RoundResult,
    TrainInstruction,
    TrainReply,
)
from hlora.runtime import Features, ModelRuntime

logger = logging.getLogger(__name__)


class InProcessTransport:
    """Runs each instruction on the shared :class:`ModelRuntime`, one client after another.

    Args:
        runtime: The shared model.
        features: Client id -> its tokenized training examples.
        on_client_done: Called as ``(client_id, rank, loss)`` after each client (progress).
        batch_size: Examples per forward pass of :meth:`feature_moments`.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        features: Mapping[str, Features],
        on_client_done: Callable[[str, int, float | None], None] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.runtime = runtime
        self.features = features
        self.on_client_done = on_client_done
        self.batch_size = batch_size

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        """Train every instructed client.

        A client whose input is bad (:class:`HloraError`, ``ValueError``) or that runs out of
        device memory is reported as a failure naming the error's type, and the round goes on.
        Any other error (a bug) propagates: it would fail every client the same way.
        """
        replies: list[TrainReply] = []
        failures: list[ClientFailure] = []
        for instruction in instructions:
            try:
                reply = self.runtime.train_client(instruction, self.features[instruction.client_id])
            except (HloraError, ValueError, torch.OutOfMemoryError) as err:
                kind = type(err).__name__
                logger.warning("client %s failed (%s): %s", instruction.client_id, kind, err)
                failures.append(
                    ClientFailure(instruction.client_id, f"training failed ({kind}): {err}")
                )
                if self.on_client_done:
                    self.on_client_done(instruction.client_id, instruction.rank, None)
                continue
            replies.append(reply)
            if self.on_client_done:
                self.on_client_done(instruction.client_id, instruction.rank, reply.loss)
        return RoundResult(replies=replies, failures=failures)

    def feature_moments(
        self, instructions: Sequence[EvalInstruction]
    ) -> tuple[list[MomentsReply], list[ClientFailure]]:
        """Every instructed client's feature moments on its training examples (see
        :meth:`ModelRuntime.feature_moments`); an error fails every client alike, so it
        propagates."""
        replies = []
        for i in instructions:
            start = time.perf_counter()
            moments = self.runtime.feature_moments(
                i.layers,
                i.extras,
                self.features[i.client_id],
                self.batch_size,
                base_version=i.base_version,
                base_delta=i.base_delta,
            )
            replies.append(MomentsReply(i.client_id, moments, time.perf_counter() - start))
        return replies, []
