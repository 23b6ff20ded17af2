"""A device whose deltas are out of bounds again and again is flagged, quarantined, kept out of rounds and
refused, until an operator releases it (coordinator/quarantine.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from fleetlora.coordinator.aggregation import DeltaAggregator, ExampleWeightedMean
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.influence import InfluenceSettings, RoundBounds
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import Storage
from fleetlora.coordinator.uploads import open_plain
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_aggregation import GLOBAL, _delta, _reasons, _task_identity, _train_reply
from tests.coordinator.test_influence import HISTORY, _hostile_app
from tests.coordinator.test_rounds import _run_config

__all__ = ["_task_identity"]  # the autouse fixture, imported so it applies here too


def test_each_broken_or_out_of_bounds_delta_is_an_anomaly_on_the_node_when_nothing_proves_who_sent_it():
    bounds = RoundBounds.for_round(InfluenceSettings(), adapter_norm=1.0, previous=HISTORY)
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, bounds)
    aggregator.add(_train_reply(1, _delta(0.5)))
    aggregator.add(_train_reply(2, _delta(500.0)))  # out of the norm bound
    aggregator.add(_train_reply(3, _delta(0.5), examples=10**9))  # bounded by the cap, not flagged
    aggregator.add(_train_reply(4, _delta(float("nan"))))
    aggregator.add(_train_reply(5, None, num_bad=[1]))  # bad metrics: proves nothing, flags nothing

    assert [device for device, _ in aggregator.anomalies] == ["node-2", "node-4"]
    assert "above the round's bound" in aggregator.anomalies[0][1] and set(aggregator.participants) == {1, 3}


def test_an_upload_from_a_device_in_quarantine_is_refused():
    aggregator = DeltaAggregator(
        GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, RoundBounds(), held=frozenset({"node-2"})
    )
    aggregator.add(_train_reply(1, _delta(0.5)))
    aggregator.add(_train_reply(2, _delta(0.5)))

    assert set(aggregator.participants) == {1}
    assert _reasons(aggregator) == ["device node-2 is in quarantine: release it to let it train again"]


def test_flags_since_the_last_release_decide_a_quarantine(sqlite_url: str):
    devices = Storage.open(sqlite_url).devices
    assert devices.flag("lin", 1, [("d1", "far out"), ("d2", "far out")], quarantine_after=2) == []
    assert devices.flag("lin", 2, [("d1", "far out again")], quarantine_after=2) == ["d1"]
    assert devices.flag("lin", 3, [("d1", "still")], quarantine_after=2) == []  # already held
    (held,) = devices.quarantined()
    assert held.device_id == "d1" and held.reason.startswith("2 anomalies, the last in round 2")

    released = devices.release("d1", "firmware fixed")
    assert released.release_reason == "firmware fixed" and devices.quarantined() == []
    # Its three old flags no longer count: one new one is not enough.
    assert devices.flag("lin", 4, [("d1", "once")], quarantine_after=2) == []
    assert devices.flag("lin", 5, [("d1", "twice")], quarantine_after=2) == ["d1"]
    assert len(devices.quarantined(released=True)) == 2
    assert devices.flag("lin", 6, [("d2", "x")], quarantine_after=0) == []  # 0: never


def test_a_device_that_keeps_sending_wrecking_deltas_is_quarantined_and_left_out(sqlite_url: str):
    config = _run_config(
        sqlite_url, **{"rounds": 4, "devices-per-round": 4, "min-devices": 3, "quarantine-after": 2}
    )
    grid = LocalGrid(_hostile_app(blow_up={101}), 4, config)

    outcomes = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert all(o.version is not None for o in outcomes)
    assert [o.quarantined for o in outcomes] == [[], ["node-101"], [], []]
    assert all(101 not in o.participants and 101 not in {d.node_id for d in o.drops} for o in outcomes[2:])
    assert all(o.sampled == 3 for o in outcomes[2:])  # the other three: the quorum still holds

    runner = CliRunner()
    listed = runner.invoke(app, ["devices", "quarantined", "--db", sqlite_url], env={"COLUMNS": "200"})
    assert (
        listed.exit_code == 0 and "node-101" in listed.output and "above the round's bound" in listed.output
    )
    refused = runner.invoke(app, ["devices", "release", "node-101", "--reason", " ", "--db", sqlite_url])
    assert refused.exit_code != 0 and "Say why" in str(refused.exception or refused.output)
    done = runner.invoke(app, ["devices", "release", "node-101", "--reason", "replaced", "--db", sqlite_url])
    assert done.exit_code == 0, done.output
    assert Storage.open(sqlite_url).devices.quarantined() == []
    (again,) = Federation(grid, CoordinatorSettings.from_run_config({**config, "rounds": 1})).run()
    assert again.sampled == 4  # released: sampled again (and its delta dropped again, once)


def test_too_few_devices_outside_quarantine_fails_the_round_and_says_where_to_look(sqlite_url: str):
    config = _run_config(sqlite_url, **{"rounds": 1, "devices-per-round": 3, "min-devices": 3})
    storage = Storage.open(sqlite_url)
    storage.versions.register_lineage("lin", "default", {}, "0" * 64, 1)  # a lineage of the fleet's tenant
    storage.devices.flag("lin", 1, [("node-101", "x")], quarantine_after=1)

    (outcome,) = Federation(
        LocalGrid(_hostile_app(), 3, config), CoordinatorSettings.from_run_config(config)
    ).run()

    assert outcome.version is None and "outside quarantine" in (outcome.error or "")
    assert "devices quarantined" in (outcome.error or "")


def test_colluders_sending_tiny_deltas_cannot_get_honest_devices_dropped_or_flagged():
    """A majority of near-zero deltas drags the round's median down; the bound stays at the adapter's norm."""
    bounds = RoundBounds.for_round(InfluenceSettings(), adapter_norm=1.0, previous=None)
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain, bounds)
    for node in (1, 2, 3):
        aggregator.add(_train_reply(node, _delta(1e-9)))
    for node in (4, 5):
        aggregator.add(_train_reply(node, _delta(0.3)))  # honest: norm 0.73

    aggregator.mark_missing([1, 2, 3, 4, 5])

    assert set(aggregator.participants) == {1, 2, 3, 4, 5} and not aggregator.anomalies


def test_a_release_ends_every_open_quarantine_of_the_device_and_counts_flags_by_id(sqlite_url: str):
    from fleetlora.coordinator.models import QuarantineEntry

    storage = Storage.open(sqlite_url)
    devices = storage.devices
    assert devices.flag("lin", 1, [("d1", "x")], quarantine_after=1) == ["d1"]
    with storage.db.session() as session:  # a second coordinator on the same database held it too
        session.add(QuarantineEntry(device_id="d1", reason="held elsewhere"))

    devices.release("d1", "fixed")

    assert devices.quarantined() == []
    assert devices.flag("lin", 2, [("d1", "y")], quarantine_after=2) == []  # one new flag, not two
