"""Live progress on the terminal while a run trains: a rich progress bar, or one plain line a
round when the output is not a terminal."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import rich.console
import rich.progress

from hlora.report.summary import as_number, round_of, round_train_loss


def format_round_line(record: Mapping[str, Any], total_rounds: int, seconds: float | None) -> str:
    """The one-line report of a finished round.

    For example ``round 3/10  loss 0.6123  accuracy 0.7107  f1 0.8021  [12.9 s]``: the training
    loss, then every numeric ``eval`` metric except the evaluation loss, in record order, then
    the round's duration. Missing parts are left out (a missing training loss shows ``-``).

    Args:
        record: The round record.
        total_rounds: The number of rounds of the run.
        seconds: The round's duration, used when the record has no ``round_time_s``.

    Returns:
        The line, without a newline.
    """
    round_num = round_of(record)
    parts = [f"round {'?' if round_num is None else round_num}/{total_rounds}"]
    loss = round_train_loss(record)
    parts.append("loss -" if loss is None else f"loss {loss:.4f}")
    evaluation = record.get("eval")
    if isinstance(evaluation, Mapping):
        for name, raw in evaluation.items():
            value = as_number(raw)
            if value is not None and name != "loss":
                parts.append(f"{name} {value:.4f}")
    duration = as_number(record.get("round_time_s"))
    if duration is None:
        duration = seconds
    if duration is not None:
        parts.append(f"[{duration:.1f} s]")
    return "  ".join(parts)


class RoundProgress:
    """Live progress of a federated run on the terminal, with :mod:`rich`.

    On a terminal it shows a bar over rounds and, inside a round, a bar over clients described
    as ``round 3/10 · client07 (r=8) · loss 0.612``. After each round it prints one line, e.g.
    ``round 3/10  loss 0.6123  accuracy 0.7107  f1 0.8021  [12.9 s]`` (see
    :func:`format_round_line`), and :meth:`log` prints free lines such as dropped clients. When
    the console is not a terminal (a log file, CI) there are no bars, but the round and log lines
    are still printed. With ``enabled=False`` nothing is printed at all.

    Lines are printed verbatim: no rich markup or highlighting, no wrapping.

    Args:
        total_rounds: The number of rounds of the run.
        enabled: Whether to show anything.
        console: The console to print to; by default a new console on standard error.

    Raises:
        ValueError: If ``total_rounds`` is not positive.

    Example:
        >>> with RoundProgress(10) as progress:  # doctest: +SKIP
        ...     progress.start_round(1, num_clients=4)
        ...     progress.client_done("client00", rank=8, loss=0.61)
        ...     progress.end_round(record)
    """

    def __init__(
        self,
        total_rounds: int,
        *,
        enabled: bool = True,
        console: rich.console.Console | None = None,
    ) -> None:
        if total_rounds < 1:
            raise ValueError(f"total_rounds must be positive, got {total_rounds}")
        self.total_rounds = total_rounds
        self.enabled = enabled
        self.console: rich.console.Console | None = None
        self._progress: rich.progress.Progress | None = None
        self._rounds_task: rich.progress.TaskID | None = None
        self._clients_task: rich.progress.TaskID | None = None
        self._round = 0
        self._round_started: float | None = None
        if not enabled:
            return
        self.console = console if console is not None else rich.console.Console(stderr=True)
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            self._progress = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}", markup=False),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._rounds_task = self._progress.add_task("rounds", total=total_rounds)
            self._clients_task = self._progress.add_task("clients", total=None, visible=False)

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _bars(self) -> Iterator[tuple[rich.progress.Progress, rich.progress.TaskID]]:
        """Yield the progress and the clients task when live bars are shown."""
        if self._progress is not None and self._clients_task is not None:
            yield self._progress, self._clients_task

    def _round_label(self) -> str:
        return f"round {self._round}/{self.total_rounds}"

    def start_round(self, round_num: int, num_clients: int) -> None:
        """Start a round: the round bar shows the rounds before it, the client bar restarts.

        Args:
            round_num: The round about to train (1-based).
            num_clients: The number of clients selected for it.
        """
        self._round = round_num
        self._round_started = time.monotonic()
        for progress, clients_task in self._bars():
            if self._rounds_task is not None:
                progress.update(
                    self._rounds_task, completed=min(max(round_num - 1, 0), self.total_rounds)
                )
            progress.reset(
                clients_task,
                total=max(num_clients, 0),
                description=self._round_label(),
                visible=True,
            )

    def client_done(self, client_id: str, rank: int, loss: float | None) -> None:
        """Advance the client bar by one finished client.

        Args:
            client_id: The client's id.
            rank: The client's LoRA rank.
            loss: The client's training loss, if it reported one.
        """
        value = as_number(loss)
        loss_text = "-" if value is None else f"{value:.3f}"
        for progress, clients_task in self._bars():
            progress.update(
                clients_task,
                advance=1,
                description=f"{self._round_label()} · {client_id} (r={rank}) · loss {loss_text}",
            )

    def end_round(self, record: Mapping[str, Any]) -> None:
        """Finish a round: advance the round bar and print the round's line.

        Args:
            record: The round record (as appended to ``metrics.jsonl``).
        """
        round_num = round_of(record)
        if round_num is None:
            round_num = self._round
            record = {**record, "round": round_num}
        seconds = None
        if self._round_started is not None:
            seconds = time.monotonic() - self._round_started
            self._round_started = None
        for progress, clients_task in self._bars():
            progress.update(clients_task, visible=False)
            if self._rounds_task is not None:
                progress.update(self._rounds_task, completed=min(round_num, self.total_rounds))
        self.log(format_round_line(record, self.total_rounds, seconds))

    def log(self, message: str) -> None:
        """Print one line above the bars (verbatim; nothing when disabled).

        Args:
            message: The line, e.g. ``"dropped client07: timeout"``.
        """
        if self.console is None:
            return
        self.console.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)
