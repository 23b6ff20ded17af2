"""An in-process Flower Grid that hands each message to a real ClientApp, for round-loop tests.

Nodes listed in ``silent`` never answer (a device that died); for nodes listed in ``expired`` the
SuperLink answers instead, with Flower's own "Message Unavailable" error (the message's time to live
ran out before the device took it); ``queued`` seconds are taken off every message's creation time
before its device gets it (an engine's queue it waited in); the ClientApp's exceptions come back as
error replies, as Flower's runtimes return them. A real device's node config reads no sensors unless
it names them (``sensors``): the test machine's own load is not what these tests are about.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_ins_message
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        run_config: dict,
        silent: Iterable[int] = (),
        expired: Iterable[int] = (),
        node_configs: list[dict] | None = None,  # real devices' node configs; default: simulated partitions
        queued: float = 0.0,
    ) -> None:
        self.app = app
        # Flower's ServerApp runtime sets these before the app's main runs; messages need them.
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 1
        self.node_ids = list(range(101, 101 + num_nodes))
        self.silent = set(silent)
        self.expired = set(expired)
        self.run_config = run_config
        self.node_configs = node_configs
        self.queued = queued
        self.replies: dict[str, Message] = {}
        self.received: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.received.append(message)
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.expired:
                unavailable = create_message_error_unavailable_ins_message(message.metadata.message_id, 1)
                self.replies[message.metadata.message_id] = unavailable
                continue
            partition = self.node_ids.index(node)
            context = Context(
                run_id=1,
                node_id=node,
                node_config=(
                    {"sensors": "none", **self.node_configs[partition]}
                    if self.node_configs
                    else {"partition-id": partition, "num-partitions": len(self.node_ids)}
                ),
                state=RecordDict(),
                run_config=self.run_config,
            )
            # Devices run one after another here; a SuperLink hands them their messages at once, so each
            # is delivered as if now, and its time to live (the round's deadline) counts from here.
            message.metadata.created_at = time.time() - self.queued
            try:
                reply = self.app(message, context)
            except Exception as exc:  # turned into an error reply, as Flower does
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        return self.pull_messages(self.push_messages(messages))
