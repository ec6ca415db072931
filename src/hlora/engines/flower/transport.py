"""The round loop's transport over Flower: one ``TRAIN`` message per node and its reply.

:class:`FlowerTransport` implements :class:`hlora.protocol.Transport` on a ServerApp's
:class:`~flwr.serverapp.Grid`; errors, timeouts and malformed replies become
:class:`~hlora.protocol.ClientFailure` with their reason, so the round goes on without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from hlora.aggregation import InvalidUpdateError
from hlora.engines.flower.codec import (
    RUN,
    content_bytes,
    decode_eval_reply,
    decode_moments_reply,
    decode_reply,
    encode_eval_instruction,
    encode_instruction,
)
from hlora.engines.flower.settings import DEFAULT_REPLY_POLL_S
from hlora.protocol import (
    ClientFailure,
    EvalInstruction,
    EvalReply,
    MomentsReply,
    RoundResult,
    TrainInstruction,
    TrainReply,
)

logger = logging.getLogger(__name__)

_Reply = TypeVar("_Reply", EvalReply, MomentsReply)

MOMENTS_MESSAGE = f"{MessageType.QUERY}.moments"
"""The message type asking a node for its feature moments (the head's calibration)."""

REFUSED = (
    "the SuperLink did not take the message: the node is not registered with it "
    "(its key was unregistered, or it never joined)"
)
"""The reason of a message the SuperLink refused at the push."""


def send_and_receive(
    grid: Grid,
    messages: Sequence[Message],
    timeout: float | None,
    poll_s: float = DEFAULT_REPLY_POLL_S,
) -> list[Message]:
    """Push ``messages``, then pull their replies every ``poll_s`` seconds until all came or
    ``timeout`` passed.

    What :meth:`flwr.serverapp.Grid.send_and_receive` does, with a shorter pause between pulls
    (Flower's is 3 s, on average 1.5 s added to every round); one pull is one small request to
    the SuperLink.

    Args:
        grid: The ServerApp's grid.
        messages: The messages (their ids are set by the push).
        timeout: Seconds to wait for the replies (None: until every reply came).
        poll_s: Seconds between pulls (> 0).

    Returns:
        The replies that came, in arrival order. A message the SuperLink did not take (it
        answers an empty id when its destination is no registered node, for instance a node
        whose key was unregistered mid-run) is not waited for: its reply is an error made here,
        :data:`REFUSED`.
    """
    pushed = list(grid.push_messages(messages))
    waiting = {message_id for message_id in pushed if message_id}
    replies = [
        Message(Error(ErrorCode.NODE_UNAVAILABLE, REFUSED), reply_to=message)
        for message, message_id in zip(messages, pushed, strict=True)
        if not message_id
    ]
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        left = None if end is None else end - time.monotonic()
        if not waiting or (left is not None and left <= 0):
            return replies
        time.sleep(poll_s if left is None else min(poll_s, left))


def match_replies(messages: Sequence[Message], replies: Iterable[Message]) -> list[Message | None]:
    """The reply to each sent message, or None where none came.

    Replies are matched by ``reply_to_message_id``, not by ``src_node_id``: the error replies
    the SuperLink itself makes for an unavailable node carry node id 0.
    """
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    return [by_request.get(m.metadata.message_id) for m in messages]


class FlowerTransport:
    """Sends each instruction to its node as a ``TRAIN`` message and collects the replies.

    A node past ``timeout`` is dropped for the round (its late reply is never matched to a
    later round: replies are matched by message id) and gets the next round's message as usual.
    A node that connects after the QUERY round is not one of the run's clients: it gets no
    message, and is reported once through ``on_node_dropped``.

    Args:
        grid: The ServerApp's grid.
        node_of: Client id -> Flower node id.
        timeout: Seconds to wait for a round's replies (None: until every node answers).
        on_client_done: Called as ``(client_id, rank, loss)`` per client (progress).
        on_node_dropped: Called as ``(node_id, reason, round)`` for each node that connected
            after the QUERY round, once.
        run_record: The run's manifest (``hlora.run``), sent beside every instruction.
        poll_s: Seconds between the pulls for replies (:func:`send_and_receive`).
        held_out: Client id -> held-out examples the node declared at join time (a federated
            evaluation asks only the nodes that declared some, and checks their replies
            against it).
        num_labels: The task's label count (to check an evaluation's confusion counts).
        counted: Whether an evaluation counts every example in its confusion (labelled
            tasks; free-form instructions count none).
    """

    def __init__(
        self,
        grid: Grid,
        node_of: Mapping[str, int],
        timeout: float | None = None,
        on_client_done: Callable[[str, int, float | None], None] | None = None,
        on_node_dropped: Callable[[int, str, int], None] | None = None,
        run_record: ConfigRecord | None = None,
        poll_s: float = DEFAULT_REPLY_POLL_S,
        held_out: Mapping[str, int] | None = None,
        num_labels: int = 2,
        counted: bool = True,
    ) -> None:
        self.grid = grid
        self.held_out = dict(held_out or {})
        self.num_labels = num_labels
        self.counted = counted
        self.poll_s = poll_s
        self.node_of = dict(node_of)
        self.timeout = timeout
        self.on_client_done = on_client_done
        self.on_node_dropped = on_node_dropped
        self.run_record = run_record
        self.late_nodes: dict[int, str] = {}
        """Node id -> why it is not in the run (it connected after the QUERY round)."""
        self.wire_bytes: dict[str, tuple[int, int]] = {}
        """Client id -> (array bytes sent, received) of the last round, ``.npy`` headers in."""

    def check_late_nodes(self, round_num: int) -> None:
        """Report each node connected now that is not one of the run's clients (once)."""
        known = set(self.node_of.values())
        for node in sorted(set(self.grid.get_node_ids()) - known - set(self.late_nodes)):
            reason = (
                "connected after the QUERY round: the run's clients are fixed at its start "
                "(a node rejoining under its registered id takes part again)"
            )
            self.late_nodes[node] = reason
            logger.warning("node %d left out: %s", node, reason)
            if self.on_node_dropped:
                self.on_node_dropped(node, reason, round_num)

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        """One round: a message per node, then replies, failures for the rest."""
        if instructions:
            self.check_late_nodes(instructions[0].round_num)
        contents = [(i.client_id, i.round_num, encode_instruction(i)) for i in instructions]
        sent = {cid: content_bytes(content) for cid, _, content in contents}
        answers = self._exchange(contents, MessageType.TRAIN)
        replies: list[TrainReply] = []
        failures: list[ClientFailure] = []
        self.wire_bytes = {}
        for instruction, answer in zip(instructions, answers, strict=True):
            cid = instruction.client_id
            node = self.node_of[cid]
            reply, failure = self._one(cid, node, answer)
            if reply is not None:
                replies.append(reply)
            if failure is not None:
                logger.warning("client %s (node %d) dropped: %s", cid, node, failure.reason)
                failures.append(failure)
            got = content_bytes(answer.content) if answer is not None and reply else 0
            self.wire_bytes[cid] = (sent[cid], got)
            logger.info("client %s (node %d): sent %d B, received %d B", cid, node, sent[cid], got)
            if self.on_client_done:
                self.on_client_done(cid, instruction.rank, reply.loss if reply else None)
        return RoundResult(replies=replies, failures=failures)

    def evaluate_round(
        self, instructions: Sequence[EvalInstruction]
    ) -> tuple[list[EvalReply], list[ClientFailure]]:
        """An ``EVALUATE`` message to every node that declared held-out data; their counts.

        A node that does not answer in time, answers with an error or with counts that do not
        match what it declared at join time is reported as a failure with its reason (it stays
        in the run: only this evaluation goes without it).
        """
        asked = [i for i in instructions if self.held_out.get(i.client_id, 0) > 0]

        def decode(content: RecordDict, cid: str) -> EvalReply:
            held_out = self.held_out[cid]
            return decode_eval_reply(content, cid, self.num_labels, held_out, self.counted)

        return self._ask(asked, MessageType.EVALUATE, decode, "not evaluated")

    def feature_moments(
        self, instructions: Sequence[EvalInstruction]
    ) -> tuple[list[MomentsReply], list[ClientFailure]]:
        """A ``query.moments`` message (the final global model) to every node; their per-class
        feature moments for the head's calibration. A node that does not answer in time,
        answers with an error or with a malformed reply is reported as a failure with its
        reason; what the moments hold is checked by the round loop."""
        return self._ask(instructions, MOMENTS_MESSAGE, decode_moments_reply, "sent no moments")

    def _ask(
        self,
        instructions: Sequence[EvalInstruction],
        message_type: str,
        decode: Callable[[RecordDict, str], _Reply],
        missing: str,
    ) -> tuple[list[_Reply], list[ClientFailure]]:
        """The global model to each instructed node as a ``message_type`` message; each reply
        decoded (``decode(content, client_id)``, which raises ``InvalidUpdateError``), and a
        failure with its reason (logged as ``missing``) for each node without a good one."""
        contents = [(i.client_id, i.round_num, encode_eval_instruction(i)) for i in instructions]
        answers = self._exchange(contents, message_type)
        replies: list[_Reply] = []
        failures: list[ClientFailure] = []
        for instruction, answer in zip(instructions, answers, strict=True):
            cid = instruction.client_id
            node = self.node_of[cid]
            failure = self._failed(cid, node, answer)
            if failure is None and answer is not None:
                try:
                    replies.append(decode(answer.content, cid))
                except InvalidUpdateError as err:
                    failure = ClientFailure(cid, f"node {node}: {err.reason}")
            if failure is not None:
                logger.warning("client %s (node %d) %s: %s", cid, node, missing, failure.reason)
                failures.append(failure)
        return replies, failures

    def _exchange(
        self, contents: Sequence[tuple[str, int, RecordDict]], message_type: str
    ) -> list[Message | None]:
        """One message of ``message_type`` per ``(client_id, round, content)``, the run's
        manifest beside each; the reply to each, or None where none came in time."""
        messages = []
        for client_id, round_num, content in contents:
            if self.run_record is not None:
                content[RUN] = self.run_record
            messages.append(
                Message(
                    content,
                    dst_node_id=self.node_of[client_id],
                    message_type=message_type,
                    group_id=str(round_num),
                )
            )
        return match_replies(
            messages, send_and_receive(self.grid, messages, self.timeout, self.poll_s)
        )

    def _failed(self, client_id: str, node: int, message: Message | None) -> ClientFailure | None:
        """The failure of a message that got no reply, or an error reply; None otherwise."""
        if message is None:
            limit = f"within {self.timeout:g} s" if self.timeout else ""
            return ClientFailure(client_id, f"node {node}: no reply {limit}".strip())
        if message.has_error():
            err = message.error
            return ClientFailure(client_id, f"node {node}: error {err.code}: {err.reason}")
        return None

    def _one(
        self, client_id: str, node: int, message: Message | None
    ) -> tuple[TrainReply | None, ClientFailure | None]:
        failure = self._failed(client_id, node, message)
        if failure is not None or message is None:
            return None, failure
        try:
            return decode_reply(message.content, client_id), None
        except InvalidUpdateError as err:
            return None, ClientFailure(client_id, f"node {node}: {err.reason}")
