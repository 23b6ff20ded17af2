"""Talking to devices with deadlines, so a device that never answers cannot hang a round.

Flower's own sampling waits forever for nodes, and ``send_and_receive`` returns only when all
replies are in; here both are bounded, and replies are handed over one by one as they arrive so
the caller can fold each into the aggregate and drop it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
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
    grid: Grid, messages: Iterable[Message], deadline: float, *, clock: Clock = time.monotonic
) -> Iterator[Message]:
    """Send ``messages``, then yield each reply as it arrives until all are in or ``deadline``."""
    pending = set(grid.push_messages(messages))
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending and clock() >= deadline:
            return
        if pending:
            time.sleep(POLL_SECONDS)


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
