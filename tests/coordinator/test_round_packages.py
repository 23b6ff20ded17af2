"""Update packages in the round loop: each round's package is recorded, and one over the cap is never sent."""

from __future__ import annotations

from pathlib import Path

from flwr.app import MessageType

from fleetlora.coordinator.storage import Storage
from fleetlora.simulations.results import summarize
from tests.coordinator.test_sealed_rounds import _run, _sealed_fleet


def test_two_rounds_bring_every_device_to_the_newest_version_with_delta_packages(tmp_path: Path, db_url: str):
    outcomes, _ = _run(_sealed_fleet(tmp_path, db_url, rounds=2))

    first, second = outcomes
    # Round 1: devices hold nothing yet and get the full adapter; round 2: the delta from round 1's version.
    assert first.distribution is not None and set(first.distribution.packages) == {None}
    assert second.distribution is not None and set(second.distribution.packages) == {first.version.id}
    assert second.distribution.statuses == {"applied": 3}
    assert all(0 < summarize(o)["package_ratio"] <= 0.10 for o in outcomes)
    rows = Storage.open(db_url).devices.updates()
    assert sorted((r.device_id, r.version_id, r.status) for r in rows) == [
        (f"partition-{i}", second.version.id, "applied") for i in range(3)
    ]
    distributing = [p for p in Storage.open(db_url).ledgers.phases() if p.phase == "distributing"]
    assert [(p.round, p.done, p.total) for p in distributing] == [(1, 3, 3), (2, 3, 3)]


def test_a_package_over_the_cap_is_never_built_and_the_round_still_stands(tmp_path: Path, db_url: str):
    config = {**_sealed_fleet(tmp_path, db_url), "package-cap": 1e-7}

    (outcome,), grid = _run(config)

    assert outcome.version is not None  # the round's version is stored
    assert outcome.package is None and outcome.distribution is None
    assert "No codec fits" in (outcome.package_error or "")
    assert "package_error" in summarize(outcome)
    assert Storage.open(db_url).packages.all() == []
    sent = {m.metadata.message_type for m in grid.received}
    assert sent == {MessageType.TRAIN, MessageType.EVALUATE}  # no device was offered anything
