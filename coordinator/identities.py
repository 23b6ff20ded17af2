"""Who each node is: its device id, known once per run, so rounds can sample devices rather than nodes.

Flower addresses a device by its node id, and the Simulation Engine draws node ids at random every
run; a device id (``partition-<id>`` for a simulated device, the enrolled name for a real one) stays
the same. The coordinator learns a node's device id from any reply that names it (a train reply
does), and asks a node it does not know yet with a ``query.identity`` message when a draw needs it.
Answers are kept while the run lasts (a node id does not change while it stays connected). A node
that answers the query with an error (a device too old for it) or not before the deadline is named
``node-<id>``, as a device without a name calls itself, until a reply of its own names it: it is
asked once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fleetlora.common import records
from fleetlora.coordinator.exchange import exchange

# Queries in flight at once: a SuperNode answers one in about its 3 s poll, so 64 at a time is ~20 nodes
# a second deployed; the Simulation Engine runs them one by one and is left at most 64 at the deadline.
QUERY_WINDOW = 64
MAX_DEVICE_ID = 128  # characters: the width of every device_id column (coordinator/models.py)


def read_device_id(answer: Mapping[str, object]) -> str | None:
    """The device id a reply claims, or None when it is missing, not a string, empty or too long."""
    device = answer.get(records.DEVICE_ID)
    if not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE_ID:
        return None
    return device


def unnamed(node: int) -> str:
    """The name of a node that did not say who it is (the device's own fallback name)."""
    return f"node-{node}"


class DeviceNames:
    """Node id → device id for the nodes of one run: from replies, else one query per node."""

    def __init__(self, grid: Grid, *, ttl: float) -> None:
        self.grid, self.ttl = grid, ttl
        self._known: dict[int, str] = {}

    def of(self, nodes: list[int], deadline: float) -> dict[int, str]:
        """Each of ``nodes``' device id; nodes not known yet are asked, until all answer or ``deadline``."""
        unknown = [node for node in nodes if node not in self._known]
        if unknown:
            self._ask(unknown, deadline)
        return {node: self._known[node] for node in nodes}

    def name(self, node: int) -> str:
        """``node``'s device id if known, else its node name (nothing is asked)."""
        return self._known.get(node) or unnamed(node)

    def learn(self, reply: Message) -> None:
        """Keep the device id a reply names (a train reply carries it, sealed or not)."""
        if reply.has_error():
            return
        name = read_device_id(reply.content.config_records.get(records.CONFIG, ConfigRecord()))
        if name is not None:
            self._known[reply.metadata.src_node_id] = name

    def _ask(self, nodes: list[int], deadline: float) -> None:
        # A query outlives nothing it was asked for: one not delivered by the deadline is dropped by the
        # SuperLink, so a device that comes back late does not answer a draw already made.
        ttl = max(1.0, min(self.ttl, deadline - time.monotonic()))
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type=records.QUERY_IDENTITY, ttl=ttl)
            for node in nodes
        ]
        for reply in exchange(self.grid, messages, deadline, window=QUERY_WINDOW):
            self.learn(reply)
        for node in nodes:
            self._known.setdefault(node, unnamed(node))
