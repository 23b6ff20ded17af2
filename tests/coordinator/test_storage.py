import dataclasses

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from fleetlora.common.delta import serialize, sha256_hex
from fleetlora.common.errors import ConfigError, CorruptVersionError, FleetloraError
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.storage import (
    Decline,
    NewVersion,
    RoundReport,
    ServerOptimizerState,
    StatusReport,
    Storage,
    VersionStore,
)
from fleetlora.coordinator.uploads import PrivacySpend


def _versions(url: str) -> VersionStore:
    return VersionStore(Database(url).initialize())


def _add(versions: VersionStore, parent: int | None, round_number: int, value: float, lineage: str = "L"):
    return versions.add(
        NewVersion(
            lineage=lineage,
            round=round_number,
            parent_id=parent,
            base_model_sha256="b" * 64,
            adapter={"w": torch.full((4, 2), value)},
            participants={"11": 30, "12": 10} if parent else {},
            metrics={"central_loss": 1.0 / (round_number + 1)},
        )
    )


def test_lineage_chain_and_hashes(db_url: str):
    versions = _versions(db_url)
    v0 = _add(versions, None, 0, 0.0)
    v1 = _add(versions, v0.id, 1, 1.0)
    v2 = _add(versions, v1.id, 2, 2.0)

    chain = versions.chain(v2.id)
    assert [v.round for v in chain] == [2, 1, 0]
    assert [v.parent_id for v in chain] == [v1.id, v0.id, None]
    assert v2.participants == {"11": 30, "12": 10}
    for version in chain:
        blob = serialize(versions.adapter(version.id))
        assert sha256_hex(blob) == version.adapter_sha256
    assert versions.latest("L").id == v2.id
    assert versions.latest("other") is None


def test_a_parent_cycle_in_a_damaged_database_is_refused_not_walked_forever(db_url: str):
    versions = _versions(db_url)
    v0 = _add(versions, None, 0, 0.0)
    v1 = _add(versions, v0.id, 1, 1.0)
    with versions.db.engine.begin() as connection:  # damage: v0's parent is now v1, a cycle
        connection.execute(
            text("UPDATE model_versions SET parent_id = :p WHERE id = :i"), {"p": v1.id, "i": v0.id}
        )

    with pytest.raises(CorruptVersionError, match=f"v{v0.id} names v{v1.id} as its parent"):
        versions.chain(v1.id)


def test_versions_survive_reopening_the_database(db_url: str):
    v0 = _add(_versions(db_url), None, 0, 0.5)
    reopened = _versions(db_url)
    assert reopened.latest("L") == v0
    assert torch.equal(reopened.adapter(v0.id)["w"], torch.full((4, 2), 0.5))


def test_corrupted_adapter_bytes_are_detected(db_url: str):
    versions = _versions(db_url)
    v0 = _add(versions, None, 0, 0.0)
    blob = bytearray(serialize({"w": torch.full((4, 2), 0.0)}))
    blob[-1] ^= 0xFF
    with versions.db.engine.begin() as connection:
        connection.execute(
            text("UPDATE model_versions SET adapter = :b WHERE id = :i"), {"b": bytes(blob), "i": v0.id}
        )
    with pytest.raises(CorruptVersionError, match=f"v{v0.id}"):
        versions.adapter(v0.id)


def test_a_round_is_stored_once_per_lineage(db_url: str):
    versions = _versions(db_url)
    v0 = _add(versions, None, 0, 0.0)
    _add(versions, v0.id, 1, 1.0)
    with pytest.raises(IntegrityError, match=r"uq_version_lineage_round|UNIQUE"):
        _add(versions, v0.id, 1, 1.0)
    assert len(versions.all("L")) == 2  # the failed insert left nothing behind


def test_bad_database_url_is_a_clear_error():
    with pytest.raises(ConfigError, match="Cannot use database URL"):
        Database("nosuchdialect://x")


def _report(**overrides) -> RoundReport:
    return RoundReport(
        **{"sampled": 3, "received": 2, "dropped": [{"node_id": 7, "reason": "late"}], "upload_bytes": 10,
           "seconds": 1.5, **overrides}
    )  # fmt: skip


def test_a_round_is_committed_whole_or_not_at_all(db_url: str):
    storage = Storage.open(db_url)
    v0 = _add(storage.versions, None, 0, 0.0)
    new = NewVersion(
        lineage="L",
        round=1,
        parent_id=v0.id,
        base_model_sha256="b" * 64,
        adapter={"w": torch.ones(4, 2)},
        participants={"11": 30},
        metrics={"train_loss": 0.5},
        optimizer=ServerOptimizerState("fedadam", {"m": torch.zeros(2)}),
    )

    v1 = storage.versions.commit_round(new, _report())

    assert (v1.round, v1.parent_id, v1.participants, v1.metrics) == (
        1,
        v0.id,
        {"11": 30},
        {"train_loss": 0.5},
    )
    (record,) = storage.ledgers.rounds("L")
    assert (record.status, record.version_id, record.round, record.received) == ("completed", v1.id, 1, 2)
    assert record.dropped == [{"node_id": 7, "reason": "late"}]
    stored = storage.versions.optimizer_state(v1.id)
    assert stored is not None and stored.name == "fedadam" and torch.equal(stored.state["m"], torch.zeros(2))
    # The same round again: the version's insert fails, and no round record is left behind either.
    with pytest.raises(IntegrityError):
        storage.versions.commit_round(new, _report())
    assert [r.version_id for r in storage.ledgers.rounds("L")] == [v1.id]
    assert len(storage.versions.all("L")) == 2


def test_failed_rounds_and_the_privacy_ledger_are_kept_in_order(db_url: str):
    ledgers = Storage.open(db_url).ledgers
    for number in (1, 2, 3):
        ledgers.record_failed_round("L", number, _report(received=0, error=f"round {number} failed"))
    spends = [PrivacySpend("d1", 1.0, 1e-5, 1.1, 0.5, 10, 0), PrivacySpend("d2", 2.0, 1e-5, 1.1, 0.5, 10, 3)]
    ledgers.record_privacy("L", 1, spends)
    ledgers.record_privacy("L", 2, [PrivacySpend("d1", 1.5, 1e-5, 1.1, 0.5, 20, 1)])

    assert [(r.round, r.status, r.error) for r in ledgers.rounds(last=2)] == [
        (2, "failed", "round 2 failed"),
        (3, "failed", "round 3 failed"),
    ]
    assert ledgers.rounds("other") == []
    assert [(e.round, e.device_id, e.epsilon) for e in ledgers.privacy_ledger("L")] == [
        (1, "d1", 1.0),
        (1, "d2", 2.0),
        (2, "d1", 1.5),
    ]
    assert ledgers.epsilon_spent() == {"d1": 1.5, "d2": 2.0}


def test_enrolment_keys_and_update_reports(db_url: str):
    devices = Storage.open(db_url).devices
    first, second = Ed25519PrivateKey.generate().public_key(), Ed25519PrivateKey.generate().public_key()
    devices.enroll("d1", "acme", first, node_id=101)
    devices.enroll("d1", "acme", second)  # re-keyed without a node id: the node id stays

    key = devices.key("d1", "acme")
    assert key is not None and key.node_id == "101" and key.public_key == second
    assert devices.key("d1", "other-tenant") is None and devices.key("d2", "acme") is None
    assert [(d.device_id, d.node_id) for d in devices.enrolled()] == [("d1", "101")]

    devices.record_update(
        "d1", tenant="acme", node_id=101, status="applied", reason=None, version_id=4, sequence=4
    )
    devices.record_update("d1", tenant="acme", node_id=101, status="failed", reason="x" * 600)
    devices.record_status_reports({"d1": StatusReport(wants_train=True), "never-reported": StatusReport()})
    (update,) = devices.updates()
    assert (update.version_id, update.sequence, update.status) == (
        4,
        4,
        "failed",
    )  # what it last said it held
    assert update.reason == "x" * 500 and update.wants_train
    assert devices.wanting_nodes() == {101}


def test_eligibility_capability_and_declines_round_trip(db_url: str):
    devices = Storage.open(db_url).devices
    for device, node in (("d1", 101), ("d2", 102)):
        devices.record_update(device, tenant="acme", node_id=node, status="current", reason=None)
    # Reported before any status said more (a device before contract 6): eligible, nothing known.
    assert {(u.eligible, u.accelerator, u.memory_bytes, u.declined_round) for u in devices.updates()} == {
        (True, None, None, None)
    }

    devices.record_status_reports(
        {
            "d1": StatusReport(accelerator="cuda", memory_bytes=6 * 2**40),  # over 32 bits: a BigInteger
            "d2": StatusReport(eligible=False, eligibility_reason="x" * 600, accelerator="cpu"),
            "never-reported": StatusReport(eligible=False),  # no row: not made from a status alone
        }
    )
    d1, d2 = devices.updates()
    assert (d1.eligible, d1.eligibility_reason) == (True, None)
    assert (d1.accelerator, d1.memory_bytes) == ("cuda", 6 * 2**40)
    assert (d2.eligible, d2.eligibility_reason, d2.accelerator) == (False, "x" * 500, "cpu")
    assert devices.ineligible_nodes() == {102}

    devices.record_declines(
        7,
        [
            Decline(101, "d1", "battery at 12%, not charging"),
            Decline(102, "d1", "forged: node 102 naming d1"),  # d1 reports from 101: lands nowhere
            Decline(103, None, "a node no device reported from"),
        ],
    )
    d1, d2 = devices.updates()
    assert (d1.eligible, d1.eligibility_reason) == (False, "battery at 12%, not charging")
    assert (d1.declined_round, d1.declined_reason) == (7, "battery at 12%, not charging")
    assert (d1.accelerator, d1.memory_bytes) == ("cuda", 6 * 2**40)  # what it said of itself stays
    assert (d2.declined_round, d2.eligibility_reason) == (None, "x" * 500)
    devices.record_declines(8, [Decline(102, None, "too hot")])  # unnamed: by the node alone
    assert devices.updates()[1].declined_reason == "too hot"
    assert devices.ineligible_nodes() == {101, 102}

    # Its next status reply, an older device's saying nothing, makes it eligible; the decline is kept.
    devices.record_status_reports({"d1": StatusReport()})
    d1 = devices.updates()[0]
    assert (d1.eligible, d1.eligibility_reason, d1.accelerator, d1.memory_bytes) == (True, None, None, None)
    assert (d1.declined_round, d1.declined_reason) == (7, "battery at 12%, not charging")
    assert devices.ineligible_nodes() == {102}


def test_a_device_reason_with_control_characters_is_stored_escaped_for_every_device(db_url: str):
    # PostgreSQL's text refuses NUL, which a protobuf string (a device's reply) may carry: one device's
    # reason must not abort the write that records every other device's.
    devices = Storage.open(db_url).devices
    for device, node in (("d1", 101), ("d2", 102)):
        devices.record_update(device, tenant="acme", node_id=node, status="failed", reason="bad\x00apply")
    devices.record_status_reports({"d1": StatusReport(eligible=False, eligibility_reason="hot\x00\x1b[2J")})
    assert devices.updates()[0].eligibility_reason == "hot\\x00\\x1b[2J"
    devices.record_declines(3, [Decline(101, "d1", "nul\x00here"), Decline(102, "d2", "honest")])
    d1, d2 = devices.updates()
    assert d1.reason == d2.reason == "bad\\x00apply"
    assert (d1.declined_reason, d2.declined_reason) == ("nul\\x00here", "honest")
    assert d1.eligibility_reason == "nul\\x00here"  # the decline's, the newer word


def test_no_orm_row_leaves_storage(db_url: str):
    storage = Storage.open(db_url)
    v0 = _add(storage.versions, None, 0, 0.0)
    storage.versions.register_lineage("L", "acme", {"name": "tiny"}, "b" * 64, 1000)
    storage.ledgers.record_failed_round("L", 1, _report(error="no quorum"))
    storage.devices.enroll("d1", "acme", Ed25519PrivateKey.generate().public_key())
    returned = [
        v0,
        storage.versions.lineage("L"),
        *storage.ledgers.rounds("L"),
        *storage.devices.enrolled(),
        storage.devices.key("d1", "acme"),
    ]
    for info in returned:
        assert dataclasses.is_dataclass(info) and info.__dataclass_params__.frozen, type(info)
    with pytest.raises(FleetloraError, match="no model record"):
        storage.versions.lineage("unknown")
