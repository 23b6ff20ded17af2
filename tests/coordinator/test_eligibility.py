"""Device eligibility through the real round loop: a decline marks its device not eligible, the next
round samples it last, and its next status reply clears the mark (the decline stays on record)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from fleetlora.client.client_app import build_client_app
from fleetlora.common import records
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.sampling import sample_devices
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import Storage
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_sealed_rounds import _sealed_fleet

DECLINER = 102  # LocalGrid's second node: partition-1
REASON = "on battery (34%), not charging"
SEED = 1  # its draw of 2 of 3 devices for round 3, eligibility aside, has partition-1 in it


def _gated_app(declines_in: int) -> ClientApp:
    """The real ClientApp, whose devices report their accelerator and memory in status replies (as a
    contract-6 device does) and whose device at ``DECLINER`` declines round ``declines_in``."""
    real, app = build_client_app(), ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        if context.node_id == DECLINER and message.content[records.CONFIG][records.ROUND] == declines_in:
            declined = ConfigRecord({records.DEVICE_ID: "partition-1", records.DECLINED: REASON})
            return Message(RecordDict({records.CONFIG: declined}), reply_to=message)
        return real(message, context)

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        return real(message, context)

    @app.query(records.QUERY_UPDATE_STATUS.removeprefix("query."))
    def update_status(message: Message, context) -> Message:
        reply = real(message, context)
        reply.content[records.CONFIG][records.ACCELERATOR] = "cpu"
        reply.content[records.CONFIG][records.MEMORY_BYTES] = 2 * 2**30
        return reply

    @app.query(records.QUERY_UPDATE_APPLY.removeprefix("query."))
    def update_apply(message: Message, context) -> Message:
        return real(message, context)

    return app


@pytest.mark.slow
def test_a_declined_train_reply_marks_its_device_not_eligible_and_the_next_draw_puts_it_last(
    tmp_path: Path, sqlite_url: str
):
    config = {**_sealed_fleet(tmp_path, sqlite_url, rounds=2), "min-devices": 3, "seed": SEED}
    grid = LocalGrid(_gated_app(declines_in=2), 3, config)

    first, second = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    # Round 1 trained everyone and brought them the new version, recording what their status said.
    assert first.version is not None and first.distribution is not None
    assert second.version is None and [d.as_dict() for d in second.drops] == [
        {"node_id": str(DECLINER), "reason": f"declined: {REASON}"}
    ]  # 2 deltas of 3 needed: no version, no distribution, so no status reply clears the mark yet
    devices = Storage.open(sqlite_url).devices
    rows = {u.device_id: u for u in devices.updates()}
    declined = rows["partition-1"]
    assert (declined.eligible, declined.eligibility_reason) == (False, REASON)
    assert (declined.declined_round, declined.declined_reason) == (2, REASON)
    assert (declined.accelerator, declined.memory_bytes) == ("cpu", 2 * 2**30)
    assert all(rows[d].eligible and rows[d].declined_round is None for d in ("partition-0", "partition-2"))
    assert devices.ineligible_nodes() == {DECLINER}

    # Resumed with 2 devices a round: the 2 eligible ones train, and the status replies that follow the
    # round say nothing of gates (a device before contract 6): eligible again, the decline kept.
    resumed = {**config, "rounds": 1, "devices-per-round": 2, "min-devices": 2}
    (third,) = Federation(grid, CoordinatorSettings.from_run_config(resumed)).run()

    assert third.version is not None and sorted(third.sampled_devices) == ["partition-0", "partition-2"]
    unaware = sample_devices([0, 1, 2], 2, set(), random.Random(f"{SEED}:3"))  # by partition, as names sort
    assert 1 in unaware  # so it was eligibility that put partition-1 out of this round
    assert devices.ineligible_nodes() == set()
    after = {u.device_id: u for u in devices.updates()}["partition-1"]
    assert (after.eligible, after.declined_round, after.declined_reason) == (True, 2, REASON)

    # The devices' deadline is what is left of the coordinator's, so a device gives up no later than it.
    deadline = CoordinatorSettings.from_run_config(config).round_deadline
    trains = [m for m in grid.received if m.metadata.message_type == "train"]
    assert trains and all(0 < m.metadata.ttl < deadline for m in trains)
