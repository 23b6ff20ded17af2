"""A simulated fleet's unreliable network: devices that never answer, and stragglers that answer late.

Production fleets lose 6–10% of a round's devices (Bonawitz et al., MLSys 2019). :class:`ChurnGrid` sits
between the coordinator and the Simulation Engine's grid and, for each round's train messages, loses
some (the device never answers: the coordinator sees no reply before the deadline) and holds back the
replies of others for ``straggler-seconds`` after they were sent. Everything else passes through.

Which devices drop is a pure function of (seed, round, device id): two runs with one seed lose the same
devices in the same rounds, whatever node ids the engine drew. A device's id is learnt from the replies
that pass through (every fleetlora reply names it, and the coordinator asks each node once before its
first draw); a node not named yet is decided by its node id.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fleetlora.common import records

Clock = Callable[[], float]


@dataclass(frozen=True)
class Churn:
    """How unreliable the simulated network is: shares of a round's sampled devices."""

    dropout: float = 0.0  # never answer
    stragglers: float = 0.0  # answer ``straggler_seconds`` after the message was sent
    straggler_seconds: float = 30.0
    seed: int = 0

    @property
    def any(self) -> bool:
        return bool(self.dropout or self.stragglers)

    def fate(self, round_number: object, device: str) -> str:
        """``"lost"``, ``"late"`` or ``"on time"`` for ``device``'s train message in that round."""
        draw = random.Random(f"churn:{self.seed}:{round_number}:{device}").random()
        if draw < self.dropout:
            return "lost"
        return "late" if draw < self.dropout + self.stragglers else "on time"


@dataclass
class ChurnGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that loses and delays train messages as ``churn`` says."""

    inner: Grid
    churn: Churn
    clock: Clock = time.monotonic
    names: dict[int, str] = field(default_factory=dict)  # node → device id, from the replies seen
    lost: list[tuple[object, str]] = field(default_factory=list)  # (round, device) never delivered
    late: list[tuple[object, str]] = field(default_factory=list)  # (round, device) answered late
    _due: dict[str, float] = field(default_factory=dict)  # a late message's id → when its reply may pass
    _held: dict[str, Message] = field(default_factory=dict)  # replies pulled before they were due

    # ---- what the churn changes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sent: list[str] = []
        for message in messages:
            fate = self._fate(message)
            if fate == "lost":  # an id no reply will ever answer
                sent.append(f"lost-{uuid.uuid4()}")
                continue
            (message_id,) = self.inner.push_messages([message])
            if fate == "late":
                self._due[message_id] = self.clock() + self.churn.straggler_seconds
            sent.append(message_id)
        return sent

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = [i for i in message_ids if not i.startswith("lost-")]
        for reply in self.inner.pull_messages([i for i in wanted if i not in self._held]):
            self._learn(reply)
            self._held[reply.metadata.reply_to_message_id] = reply
        now = self.clock()
        ready = [i for i in wanted if i in self._held and self._due.get(i, 0.0) <= now]
        for message_id in ready:
            self._due.pop(message_id, None)
        return [self._held.pop(i) for i in ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's own loop, over the churned push and pull (a lost message times out)."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else self.clock() + timeout
        replies: list[Message] = []
        while pending and (end is None or self.clock() < end):
            for reply in self.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pending:
                time.sleep(0.1)
        return replies

    def _fate(self, message: Message) -> str:
        if message.metadata.message_type != MessageType.TRAIN:
            return "on time"
        node = message.metadata.dst_node_id
        round_number = message.content.config_records[records.CONFIG].get(records.ROUND)
        device = self.names.get(node, f"node-{node}")
        fate = self.churn.fate(round_number, device)
        if fate != "on time":
            (self.lost if fate == "lost" else self.late).append((round_number, device))
        return fate

    def _learn(self, reply: Message) -> None:
        if reply.has_error() or records.CONFIG not in reply.content.config_records:
            return
        device = reply.content.config_records[records.CONFIG].get(records.DEVICE_ID)
        if isinstance(device, str):
            self.names[reply.metadata.src_node_id] = device

    # ---- passed through

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()
