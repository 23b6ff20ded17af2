"""Talking to devices with deadlines, so a device that never answers cannot hang a round.

Flower's own sampling waits forever for nodes, and ``send_and_receive`` returns only when all
replies are in; here both are bounded, and replies are handed over one by one as they arrive so
the caller can fold each into the aggregate and drop it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fleetlora.common import records
from fleetlora.common.delta import State, to_array_record
from fleetlora.common.errors import QuorumError
from fleetlora.common.messages import Instructions

Clock = Callable[[], float]
POLL_SECONDS = 0.2


def wait_for_nodes(grid: Grid, minimum: int, deadline: float, *, clock: Clock = time.monotonic) -> list[int]:
    """Connected node ids once at least ``minimum`` are online; :class:`QuorumError` at ``deadline``."""
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if clock() >= deadline:
            raise QuorumError(f"Only {len(nodes)} of the {minimum} devices needed were online.")
        time.sleep(POLL_SECONDS)


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    deadline: float,
    *,
    window: int | None = None,
    clock: Clock = time.monotonic,
) -> Iterator[Message]:
    """Send ``messages``, then yield each reply as it arrives until all are in or ``deadline``.

    ``window``: at most that many messages in flight, the next sent as a reply frees a place. The
    Simulation Engine queues everything it is sent and runs it in order, expired or not, each queued
    message slowing its scans: a thousand queries sent at once are still running rounds later, in
    front of the train messages. A window keeps what is left at the deadline to at most ``window``.

    An error the SuperLink answers in a device's place (its message expired before the device took
    it, or the device's SuperNode left) comes from the SuperLink's own node id: it is yielded as the
    error of the device it was sent to, so that device is the one dropped, with the reason.
    """
    unsent = list(messages)
    sent: dict[str, Message] = {}
    pending: set[str] = set()
    while True:
        room = len(unsent) if window is None else max(0, window - len(pending))
        if room and unsent:
            batch, unsent = unsent[:room], unsent[room:]
            pending.update(i for i in grid.push_messages(batch) if i)  # a failed push never answers
            sent.update((message.metadata.message_id, message) for message in batch)
        if not pending and not unsent:
            return
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield _for_its_device(reply, sent)
        if clock() >= deadline:
            return
        if pending and (window is None or len(pending) >= window or not unsent):
            time.sleep(POLL_SECONDS)


def _for_its_device(reply: Message, sent: Mapping[str, Message]) -> Message:
    original = sent.get(reply.metadata.reply_to_message_id)
    if original is None or reply.metadata.src_node_id != SUPERLINK_NODE_ID or not reply.has_error():
        return reply
    reason = f"the SuperLink answered for it: {reply.error.reason}"
    return Message(Error(code=reply.error.code, reason=reason), reply_to=original)


def round_messages(
    nodes: list[int],
    state: State,
    instructions: Instructions | Mapping[int, Instructions],
    kind: str,
    *,
    ttl: float,
) -> list[Message]:
    """One ``kind`` message per node carrying the global adapter and the round's instructions.

    ``instructions`` is one for all nodes, or one per node (a device's DP plan is its own);
    each distinct one is encoded once. ``ttl`` is the round deadline: a device that comes back late
    does not train a stale round.
    """
    arrays = to_array_record(state)  # encoded once per round
    encoded: dict[Instructions, ConfigRecord] = {}
    messages = []
    for node in nodes:
        its = instructions if isinstance(instructions, Instructions) else instructions[node]
        if its not in encoded:
            encoded[its] = its.to_record()
        config = encoded[its]
        messages.append(
            Message(
                RecordDict({records.ARRAYS: arrays, records.CONFIG: config}),
                dst_node_id=node,
                message_type=kind,
                ttl=ttl,
            )
        )
    return messages
