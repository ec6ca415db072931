"""The in-process engine: which client errors are routine failures and which stop the run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hlora.engines.inprocess import InProcessTransport
from hlora.errors import DataError
from hlora.protocol import TrainInstruction


class _Runtime:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def train_client(self, instruction: TrainInstruction, features: Any) -> Any:
        raise self.error


def _instruction() -> TrainInstruction:
    return TrainInstruction("client03", 1, 4, 2.0, None, {}, init_seed=0, train_seed=0)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "OutOfMemoryError"),
        (DataError("no examples"), "DataError"),
        (ValueError("bad shapes"), "ValueError"),
    ],
)
def test_routine_client_errors_are_failures_naming_their_type(
    error: BaseException, kind: str
) -> None:
    transport = InProcessTransport(_Runtime(error), {"client03": []})  # type: ignore[arg-type]
    result = transport.run_round([_instruction()])
    (failure,) = result.failures
    assert failure.client_id == "client03"
    assert failure.reason.startswith(f"training failed ({kind}): ")
    assert result.replies == []


def test_a_bug_stops_the_run() -> None:
    transport = InProcessTransport(_Runtime(RuntimeError("shape bug")), {"client03": []})  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="shape bug"):
        transport.run_round([_instruction()])
