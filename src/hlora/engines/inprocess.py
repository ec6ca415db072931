"""The in-process engine: every client trains in this process on one shared model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from hlora.errors import HloraError
from hlora.protocol import ClientFailure, RoundResult, TrainInstruction, TrainReply
from hlora.runtime import Features, ModelRuntime

logger = logging.getLogger(__name__)


class InProcessTransport:
    """Runs each instruction on the shared :class:`ModelRuntime`, one client after another.

    Args:
        runtime: The shared model.
        features: Client id -> its tokenized training examples.
        on_client_done: Called as ``(client_id, rank, loss)`` after each client (progress).
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        features: Mapping[str, Features],
        on_client_done: Callable[[str, int, float | None], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.features = features
        self.on_client_done = on_client_done

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
