"""The SuperLink's node list as `coordinator up`'s console and metrics read it: never waited on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fleetlora.common.host_config import CoordinatorHost
from fleetlora.coordinator import flower_control
from fleetlora.coordinator.flower_control import ControlError, OnlineNodes


def test_without_an_answer_yet_or_after_a_failed_ask_readers_are_told_at_once(tmp_path: Path):
    nodes = OnlineNodes(CoordinatorHost(state_dir=tmp_path))
    with pytest.raises(ControlError, match="not been asked"):
        nodes()
    nodes.refresh()  # no SuperLink connection was ever written here: flwr is not even run
    with pytest.raises(ControlError, match="coordinator up"):
        nodes()


def test_a_hung_superlink_never_holds_up_a_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hang, unblock = threading.Event(), threading.Event()

    def list_nodes(host: CoordinatorHost) -> list[dict[str, object]]:
        if hang.is_set():
            unblock.wait(30)  # a SuperLink that stopped answering
        return [{"node-id": 1, "status": "online"}, {"node-id": 2, "status": "offline"}]

    monkeypatch.setattr(flower_control, "list_nodes", list_nodes)
    nodes = OnlineNodes(CoordinatorHost(state_dir=tmp_path))
    nodes.refresh()
    hang.set()
    asking = threading.Thread(target=nodes.refresh, daemon=True)
    asking.start()
    started = time.monotonic()
    seen = [nodes() for _ in range(100)]  # while the ask hangs: the last answer, at once
    assert time.monotonic() - started < 1.0 and asking.is_alive()
    assert all(s == {"1"} for s in seen)
    unblock.set()
    asking.join(5)
