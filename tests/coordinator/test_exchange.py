"""Talking to devices with deadlines: replies as they come, a window on what is in flight, and errors the
SuperLink answers in a device's place put on that device."""

from __future__ import annotations

import itertools

from flwr.app import Message, RecordDict

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.coordinator.exchange import exchange
from tests.coordinator.local_grid import LocalGrid


def _queries(grid: LocalGrid) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=node, message_type=records.QUERY_IDENTITY, ttl=30.0)
        for node in grid.node_ids
    ]


class _Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.ticks = itertools.count()

    def __call__(self) -> float:
        return float(next(self.ticks))


def test_a_window_keeps_that_many_in_flight_and_every_reply_still_comes():
    grid = LocalGrid(build_client_app(), num_nodes=10, run_config={})
    batches: list[int] = []
    push = grid.push_messages
    grid.push_messages = lambda messages: batches.append(len(messages)) or push(messages)  # type: ignore[method-assign]

    replies = list(exchange(grid, _queries(grid), deadline=float("inf"), window=4))

    assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.node_ids)
    assert max(batches) <= 4 and sum(batches) == 10


def test_without_a_window_everything_is_sent_at_once():
    grid = LocalGrid(build_client_app(), num_nodes=10, run_config={})
    batches: list[int] = []
    push = grid.push_messages
    grid.push_messages = lambda messages: batches.append(len(messages)) or push(messages)  # type: ignore[method-assign]

    assert len(list(exchange(grid, _queries(grid), deadline=float("inf")))) == 10
    assert batches == [10]


def test_what_the_window_has_not_sent_by_the_deadline_is_never_sent():
    """Silent devices hold the window's places: the rest wait, and the deadline ends the exchange."""
    grid = LocalGrid(build_client_app(), num_nodes=6, run_config={}, silent={101, 102})

    replies = list(exchange(grid, _queries(grid), deadline=3.0, window=2, clock=_Clock()))

    assert replies == [] and [m.metadata.dst_node_id for m in grid.received] == [101, 102]


def test_an_expired_message_is_its_devices_error_not_the_superlinks():
    grid = LocalGrid(build_client_app(), num_nodes=3, run_config={}, expired={102, 103})

    replies = list(exchange(grid, _queries(grid), deadline=float("inf")))

    by_node = {r.metadata.src_node_id: r for r in replies}
    assert set(by_node) == {101, 102, 103}
    assert not by_node[101].has_error()
    for node in (102, 103):
        error = by_node[node].error.reason
        assert error.startswith("the SuperLink answered for it:") and "Message Unavailable" in error
