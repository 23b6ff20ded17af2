"""A small fleet written through the storage API, as the console reads it: devices (one with a hostile
id), versions with metrics, a privacy ledger, an update package with reports, a round in progress, and a
second tenant whose rows must never show."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetlora.common.package import Manifest
from fleetlora.coordinator.storage import NewVersion, StatusReport, Storage
from fleetlora.coordinator.storage.ledgers import PrivacySpend

TENANT = "fleet-a"
OTHER_TENANT = "fleet-b"
LINEAGE = "a1" * 32
OTHER_LINEAGE = "b2" * 32
HOSTILE_ID = "<script>alert(1)</script>"
HOSTILE_METRIC = '"><img src=x onerror=alert(2)>'
BASE_BYTES = 90_000_000


@dataclass(frozen=True)
class Fleet:
    storage: Storage
    version_ids: list[int]  # rounds 0..3
    training_phase: int  # the id of the current round's training phase (3 of 5 answered)


def fill(db_url: str, *, devices: int = 0) -> Fleet:
    """Write the fleet (``devices`` more plain ones beside the named ones, for a fuller screenshot)."""
    storage = Storage.open(db_url, TENANT)
    storage.versions.register_lineage(LINEAGE, TENANT, {"name": "minilm"}, "c" * 64, BASE_BYTES)
    accuracy = [0.61, 0.74, 0.83, 0.88]
    ids: list[int] = []
    for round_number, central in enumerate(accuracy):
        metrics: dict[str, object] = {"central_accuracy": central, "central_loss": 1.5 - central}
        if round_number:
            metrics["federated_eval_accuracy"] = central - 0.03
        if round_number == 3:
            metrics["note"] = HOSTILE_METRIC
        version = storage.versions.add(
            NewVersion(
                lineage=LINEAGE,
                round=round_number,
                parent_id=ids[-1] if ids else None,
                base_model_sha256="c" * 64,
                adapter={"w": torch.full((2, 2), float(round_number))},
                participants={"101": 40, "102": 35, "103": 20} if round_number else {},
                metrics=metrics,
            )
        )
        ids.append(version.id)
    for round_number, epsilon in ((1, 2.5), (2, 4.75), (3, 6.0)):
        storage.ledgers.record_privacy(
            LINEAGE,
            round_number,
            [_spend("dev-1", epsilon), _spend("dev-2", epsilon - 0.5), _spend(HOSTILE_ID, 1.0)],
        )
    named = [("dev-1", 101), ("dev-2", 102), ("dev-3", 103), (HOSTILE_ID, 104)]
    extra = [(f"shop-{n:03d}", 200 + n) for n in range(devices)]
    for device_id, node in named + extra:
        storage.devices.enroll(device_id, TENANT, Ed25519PrivateKey.generate().public_key(), node)
    storage.devices.record_update(
        "dev-1", tenant=TENANT, node_id=101, status="applied", reason=None, version_id=ids[3], sequence=3
    )
    storage.devices.record_update(
        "dev-2",
        tenant=TENANT,
        node_id=102,
        status="failed",
        reason="disk full",
        version_id=ids[2],
        sequence=2,
    )
    for device_id, node in extra:
        storage.devices.record_update(
            device_id,
            tenant=TENANT,
            node_id=node,
            status="applied",
            reason=None,
            version_id=ids[3],
            sequence=3,
        )
    storage.devices.record_status_reports({"dev-1": StatusReport(wants_train=True)})
    storage.devices.flag(LINEAGE, 3, [("dev-2", "norm above cap")], quarantine_after=0)
    storage.devices.flag(LINEAGE, 3, [("dev-3", "norm above cap")], quarantine_after=1)
    storage.packages.add(_manifest(ids[2], ids[3]), b"p" * 4_500_000, cap=0.1, build_seconds=0.8)
    for phase in ("sampling", "training", "aggregating", "evaluating", "publishing", "distributing"):
        storage.ledgers.enter_phase(LINEAGE, 3, phase, total=3)
    storage.ledgers.enter_phase(LINEAGE, 3, "completed", detail=f"v{ids[3]}")
    storage.ledgers.enter_phase(LINEAGE, 4, "sampling")
    training = storage.ledgers.enter_phase(LINEAGE, 4, "training", total=5)
    storage.ledgers.advance_phase(training.id, 3)
    _other_tenant(db_url)
    return Fleet(storage, ids, training.id)


def _other_tenant(db_url: str) -> None:
    other = Storage.open(db_url, OTHER_TENANT)
    other.versions.register_lineage(OTHER_LINEAGE, OTHER_TENANT, {"name": "minilm"}, "d" * 64, BASE_BYTES)
    other.devices.enroll("other-fleet-device", OTHER_TENANT, Ed25519PrivateKey.generate().public_key(), 900)
    other.versions.add(
        NewVersion(OTHER_LINEAGE, 0, None, "d" * 64, {"w": torch.zeros(2)}, {}, {"central_accuracy": 0.11})
    )
    other.ledgers.enter_phase(OTHER_LINEAGE, 9, "sampling")  # newer than fleet-a's round: must not show
    other.close()


def _spend(device_id: str, epsilon: float) -> PrivacySpend:
    return PrivacySpend(device_id, epsilon, 1e-5, 1.1, 0.05, 40, 0)


def _manifest(from_version: int, to_version: int) -> Manifest:
    created = datetime.now(UTC)
    return Manifest(
        tenant=TENANT,
        lineage=LINEAGE,
        model={"name": "minilm"},
        base_sha256="c" * 64,
        base_bytes=BASE_BYTES,
        from_version=from_version,
        to_version=to_version,
        sequence=3,
        created=created.isoformat(),
        expires=(created + timedelta(days=7)).isoformat(),
        payload_sha256="e" * 64,
        payload_length=4_400_000,
        codec="int8+zstd",
        reconstruction_error=0.01,
    )
