"""A device's status answer is read field by field: a malformed one is counted, never trusted or fatal."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from fleetlora.common import records
from fleetlora.coordinator.distribution import MAX_MEMORY_BYTES, Distributor, Holding, read_status_report
from fleetlora.coordinator.packages import PackagePolicy
from fleetlora.coordinator.storage import NewVersion, StatusReport, Storage, VersionInfo
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_aggregation import _task_identity

__all__ = ["_task_identity"]  # the autouse fixture: Flower's runtime identity for building messages


def test_a_well_formed_answer_is_read_and_an_absent_version_means_none():
    held = Holding.read(
        ConfigRecord({records.DEVICE_ID: "d1", records.ACTIVE_VERSION: 4, records.ACTIVE_SEQUENCE: 4})
    )
    fresh = Holding.read(ConfigRecord({records.DEVICE_ID: "d2", records.ACTIVE_SEQUENCE: 0}))

    assert held == Holding("d1", 4, 4)
    assert fresh == Holding("d2", None, 0)


@pytest.mark.parametrize(
    "answer",
    [
        {},  # no device id
        {records.DEVICE_ID: ""},
        {records.DEVICE_ID: "x" * 129},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: "7"},  # a string where a version goes
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: 1.5},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: -1},  # the old "none" sentinel
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: True},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: 3, records.ACTIVE_SEQUENCE: -2},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: [3, 4]},
    ],
)
def test_a_malformed_answer_is_refused(answer):
    assert Holding.read(ConfigRecord(answer)) is None


def test_a_status_answer_cannot_speak_for_a_device_enrolled_from_another_node(sqlite_url: str):
    """Node 102 claims to be phone-1, which was enrolled from node 101: nothing of phone-1 is repointed."""
    storage = Storage.open(sqlite_url)
    storage.devices.enroll("phone-1", "default", Ed25519PrivateKey.generate().public_key(), node_id=101)
    storage.devices.enroll("phone-2", "default", Ed25519PrivateKey.generate().public_key(), node_id=102)
    target = storage.versions.add(
        NewVersion(
            lineage="L", round=0, parent_id=None, base_model_sha256="b" * 64,
            adapter={"w": torch.zeros(2)}, participants={}, metrics={},
        )
    )  # fmt: skip

    claimed = ["phone-1"]

    def claims_phone_1(message: Message, context) -> Message:
        answer = {
            records.DEVICE_ID: claimed[0],
            records.ACTIVE_VERSION: target.id,
            records.WANTS_TRAIN: True,
            records.ELIGIBLE: False,
            records.NOT_ELIGIBLE: "charging",
        }
        return Message(RecordDict({records.CONFIG: ConfigRecord(answer)}), reply_to=message)

    grid = LocalGrid(claims_phone_1, 2, {})
    distributor = Distributor(
        grid, storage, Ed25519PrivateKey.generate(), PackagePolicy(), tenant="default", timeout=5.0
    )
    outcome = distributor.distribute([102], target)

    assert dict(outcome.statuses) == {"impostor": 1}
    assert storage.devices.updates() == [] and storage.devices.wanting_nodes() == set()
    assert storage.devices.ineligible_nodes() == set()

    # A device of another tenant cannot be spoken for either.
    Storage.open(sqlite_url, "other").devices.enroll(
        "tablet-1", "other", Ed25519PrivateKey.generate().public_key()
    )
    claimed[0] = "tablet-1"
    assert dict(distributor.distribute([102], target).statuses) == {"impostor": 1}


def test_a_version_applied_by_hand_is_recorded_when_the_device_next_answers(sqlite_url: str):
    """The device went from v1 to v2 with `device apply`; the coordinator, which sent it v1, learns of v2
    from the status answer even though the device never answers the offer of v3 that follows."""
    storage = Storage.open(sqlite_url)
    storage.versions.register_lineage("L", "default", {}, "b" * 64, 10_000_000)
    versions = []
    for round_number in range(3):
        versions.append(
            storage.versions.add(
                NewVersion(
                    lineage="L", round=round_number, parent_id=versions[-1].id if versions else None,
                    base_model_sha256="b" * 64, adapter={"w": torch.full((2,), float(round_number))},
                    participants={}, metrics={},
                )
            )
        )  # fmt: skip
    v1, v2, v3 = versions
    storage.devices.record_update("phone-1", tenant="default", node_id=101, status="applied", reason=None,
                                  version_id=v1.id, sequence=1)  # fmt: skip

    def holds_v2_and_drops_offers(message: Message, context) -> Message:
        if message.metadata.message_type == records.QUERY_UPDATE_APPLY:
            raise RuntimeError("battery died")
        answer = {records.DEVICE_ID: "phone-1", records.ACTIVE_VERSION: v2.id, records.ACTIVE_SEQUENCE: 2}
        return Message(RecordDict({records.CONFIG: ConfigRecord(answer)}), reply_to=message)

    grid = LocalGrid(holds_v2_and_drops_offers, 1, {})
    distributor = Distributor(
        grid, storage, Ed25519PrivateKey.generate(), PackagePolicy(), tenant="default", timeout=5.0
    )
    outcome = distributor.distribute([101], v3)

    assert dict(outcome.statuses) == {"failed": 1}
    (update,) = storage.devices.updates()
    assert (update.device_id, update.version_id, update.status) == ("phone-1", v2.id, "failed")


# ---- eligibility and capability: each value checked on its own --------------------------------------


def test_a_status_answer_from_a_device_before_contract_6_reads_eligible_with_nothing_else_known():
    assert read_status_report(ConfigRecord({records.DEVICE_ID: "d1", records.ACTIVE_SEQUENCE: 0})) == (
        StatusReport(
            wants_train=False, eligible=True, eligibility_reason=None, accelerator=None, memory_bytes=None
        )
    )


def test_a_well_formed_eligibility_and_capability_are_read_whole():
    answer = {
        records.WANTS_TRAIN: True,
        records.ELIGIBLE: False,
        records.NOT_ELIGIBLE: "on battery (34%); metered network",
        records.ACCELERATOR: "mps",
        records.MEMORY_BYTES: 6 * 2**30,
    }
    assert read_status_report(ConfigRecord(answer)) == StatusReport(
        True, False, "on battery (34%); metered network", "mps", 6 * 2**30
    )
    limits = {records.ELIGIBLE: True, records.ACCELERATOR: "cpu", records.MEMORY_BYTES: MAX_MEMORY_BYTES}
    assert read_status_report(ConfigRecord(limits)) == StatusReport(False, True, None, "cpu", 2**50)
    assert read_status_report(ConfigRecord({records.MEMORY_BYTES: 0})).memory_bytes == 0


@pytest.mark.parametrize(
    ("answer", "read"),
    [
        # ELIGIBLE must be a bool: anything else is not said, so eligible (never a falsy 0 or "" read as no)
        ({records.ELIGIBLE: 0, records.NOT_ELIGIBLE: "x"}, StatusReport()),
        ({records.ELIGIBLE: "false"}, StatusReport()),
        ({records.ELIGIBLE: [False]}, StatusReport()),
        # the reason: a non-empty str, cut to 500 characters, kept only with a no
        (
            {records.ELIGIBLE: False, records.NOT_ELIGIBLE: "x" * 10_000},
            StatusReport(eligible=False, eligibility_reason="x" * 500),
        ),
        ({records.ELIGIBLE: False, records.NOT_ELIGIBLE: 42}, StatusReport(eligible=False)),
        ({records.ELIGIBLE: False, records.NOT_ELIGIBLE: ""}, StatusReport(eligible=False)),
        ({records.ELIGIBLE: False, records.NOT_ELIGIBLE: b"hot"}, StatusReport(eligible=False)),
        ({records.ELIGIBLE: True, records.NOT_ELIGIBLE: "contradicts itself"}, StatusReport()),
        # the accelerator: one of four names, exactly
        ({records.ACCELERATOR: "tpu"}, StatusReport()),
        ({records.ACCELERATOR: "CUDA"}, StatusReport()),
        ({records.ACCELERATOR: "cuda" * 100}, StatusReport()),
        ({records.ACCELERATOR: 1}, StatusReport()),
        # the memory: an int in [0, 2**50]
        ({records.MEMORY_BYTES: -1}, StatusReport()),
        ({records.MEMORY_BYTES: 2**50 + 1}, StatusReport()),
        ({records.MEMORY_BYTES: 8e9}, StatusReport()),
        ({records.MEMORY_BYTES: True}, StatusReport()),
        ({records.MEMORY_BYTES: "8589934592"}, StatusReport()),
        ({records.WANTS_TRAIN: 1}, StatusReport()),
    ],
)
def test_a_hostile_eligibility_or_capability_value_counts_as_not_said(answer: dict, read: StatusReport):
    assert read_status_report(ConfigRecord(answer)) == read


def _target(storage: Storage) -> VersionInfo:
    return storage.versions.add(
        NewVersion(
            lineage="L", round=0, parent_id=None, base_model_sha256="b" * 64,
            adapter={"w": torch.zeros(2)}, participants={}, metrics={},
        )
    )  # fmt: skip


def test_a_status_answer_stores_eligibility_and_capability_and_a_bad_value_leaves_the_version_read(
    sqlite_url: str,
):
    storage = Storage.open(sqlite_url)
    target = _target(storage)
    answers = {
        101: {records.ELIGIBLE: False, records.NOT_ELIGIBLE: "in use", records.ACCELERATOR: "cuda",
              records.MEMORY_BYTES: 12 * 2**30},
        102: {records.ELIGIBLE: "maybe", records.ACCELERATOR: "quantum", records.MEMORY_BYTES: -5},
        103: {},  # a device before contract 6
    }  # fmt: skip

    def holds_the_target(message: Message, context) -> Message:
        answer = {records.DEVICE_ID: f"phone-{context.node_id}", records.ACTIVE_VERSION: target.id}
        return Message(RecordDict({records.CONFIG: ConfigRecord({**answer, **answers[context.node_id]})}),
                       reply_to=message)  # fmt: skip

    grid = LocalGrid(holds_the_target, 3, {})
    distributor = Distributor(
        grid, storage, Ed25519PrivateKey.generate(), PackagePolicy(), tenant="default", timeout=5.0
    )
    outcome = distributor.distribute(grid.node_ids, target)

    assert dict(outcome.statuses) == {"current": 3}  # a bad capability value refuses nothing
    read = [(u.device_id, u.eligible, u.eligibility_reason, u.accelerator, u.memory_bytes)
            for u in storage.devices.updates()]  # fmt: skip
    assert read == [
        ("phone-101", False, "in use", "cuda", 12 * 2**30),
        ("phone-102", True, None, None, None),
        ("phone-103", True, None, None, None),
    ]
    assert storage.devices.ineligible_nodes() == {101}

    answers[101] = {records.ELIGIBLE: True, records.ACCELERATOR: "cuda", records.MEMORY_BYTES: 12 * 2**30}
    distributor.distribute([101], target)  # its gates opened: its next answer says so
    assert storage.devices.ineligible_nodes() == set() and storage.devices.updates()[0].eligible
