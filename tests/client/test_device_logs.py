"""A deployed device's ClientApp logs what it did with each round to ``state-dir/logs/client-app.jsonl``,
and each message it handled with its timings.

The real ClientApp answers train messages through a local grid with a real device's node config (its
``device-id`` and ``state-dir``); a simulated device, which has neither, writes no log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import RecordDict

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.common.config import ModelSpec, PrivacySettings, TrainSettings
from fleetlora.common.delta import to_array_record, trainable_state
from fleetlora.common.logs import LOGGER, ConsoleHandler, JsonLinesHandler, search_logs
from fleetlora.common.messages import Instructions
from fleetlora.common.model import cached_model
from tests.coordinator.local_grid import LocalGrid


@pytest.fixture(autouse=True)
def detached() -> Iterator[None]:
    yield
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, JsonLinesHandler | ConsoleHandler):
            logger.removeHandler(handler)
            handler.close()


def train_once(spec: ModelSpec, node: dict, epsilon: float) -> RecordDict:
    settings = TrainSettings(local_steps=2, batch_size=8, privacy=PrivacySettings(epsilon=epsilon))
    loaded = cached_model(spec)
    instructions = Instructions(spec, settings, round=4, version=3, base_sha256=loaded.base_sha256)
    content = RecordDict(
        {
            records.CONFIG: instructions.to_record(),
            records.ARRAYS: to_array_record(trainable_state(loaded.model)),
        }
    )
    grid = LocalGrid(build_client_app(), 1, {}, node_configs=[node])
    (reply,) = grid.send_and_receive([grid.create_message(content, "train", grid.node_ids[0], "")])
    return reply.content


def test_a_trained_and_a_declined_round_are_logged_with_the_device_and_why(
    tmp_path: Path, tiny_spec: ModelSpec
):
    node = {
        "device-id": "kiosk-7",
        "data-path": "builtin",
        "state-dir": str(tmp_path),
        "upload-consent": True,
    }
    train_once(tiny_spec, node, epsilon=0.0)  # no DP asked, no floor: it trains
    declined = train_once(tiny_spec, {**node, "dp-max-epsilon": 8}, epsilon=1000.0)
    assert records.DECLINED in declined[records.CONFIG]

    entries = list(search_logs(tmp_path / "logs", device="kiosk-7"))
    handled = [e for e in entries if e["event"] == "message_handled"]
    trained, refused = [e for e in entries if e["event"] != "message_handled"]
    assert (trained["component"], trained["event"], trained["round"], trained["version"]) == (
        "client-app", "round_trained", 4, "v3",
    )  # fmt: skip
    assert trained["steps"] == 2 and trained["examples"] > 0 and "Trained round 4" in trained["message"]
    assert (refused["event"], refused["round"]) == ("round_declined", 4)
    assert "asks ε 1000" in refused["message"]
    assert [e["message_type"] for e in handled] == ["train", "train"]
    for entry in handled:  # in-process: no warm runner took a task
        assert entry["sent_at"] <= entry["started_at"] and entry["seconds"] > 0
        assert entry["acquired_at"] is None


def test_a_simulated_device_writes_no_log(tmp_path: Path, tiny_spec: ModelSpec):
    train_once(tiny_spec, {"data-path": "builtin", "state-dir": str(tmp_path), "upload-consent": True}, 0.0)
    assert not (tmp_path / "logs").exists()
