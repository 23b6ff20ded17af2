"""Tenants share one coordinator database and never see each other's rows.

Two fleets, ``acme`` and ``globex``, each with a lineage, versions, an optimizer state, a package,
rounds, ledger entries, enrolled devices, update reports, flags, a quarantine and a key set, are written
to one database; every read of a store scoped to one tenant is then checked to return only that tenant's
rows, and every write into the other's lineage is refused. A meta-test keeps the list honest: a new
public store method fails it until it is placed among the readers checked here or the writers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetlora.common.config import ModelSpec, to_config
from fleetlora.common.data import Example
from fleetlora.common.errors import FleetloraError
from fleetlora.common.model import cached_model
from fleetlora.coordinator.keys import init_keys, load_signing_key
from fleetlora.coordinator.packages import PackagePolicy, build_package
from fleetlora.coordinator.rounds import lineage_of
from fleetlora.coordinator.storage import (
    Decline,
    DeviceStore,
    KeySetStore,
    LedgerStore,
    NewVersion,
    PackageStore,
    RoundReport,
    ServerOptimizerState,
    StatusReport,
    Storage,
    VersionStore,
)
from fleetlora.coordinator.uploads import PrivacySpend

TENANTS = ("acme", "globex")


@dataclass
class Written:
    """What one tenant's fleet wrote: the ids and names its scoped reads must return."""

    lineage: str
    version_ids: list[int]
    package_id: int
    devices: list[str]
    nodes: list[int]  # the devices' SuperNode ids, unique across tenants as on one SuperLink
    key_set_id: int


def _populate(storage: Storage, tenant: str, tiny_spec: ModelSpec, key: Ed25519PrivateKey) -> Written:
    loaded = cached_model(tiny_spec)
    lineage = lineage_of(loaded, tenant)
    scoped = Storage(storage.db, *(type(s)(storage.db, tenant) for s in _stores(storage)), storage.audit)
    scoped.versions.register_lineage(
        lineage, tenant, to_config(tiny_spec, "model"), loaded.base_sha256, loaded.base_bytes
    )
    key_set = scoped.key_sets.add(f"{tenant} key set", [Example("my card was declined", tiny_spec.labels[0])])
    ids: list[int] = []
    for round_number in range(2):
        adapter = {n: t + 0.01 * round_number for n, t in loaded.initial_adapter.items()}
        version = NewVersion(
            lineage=lineage,
            round=round_number,
            parent_id=ids[-1] if ids else None,
            base_model_sha256=loaded.base_sha256,
            adapter=adapter,
            participants={"1": 10} if ids else {},
            metrics={},
            optimizer=ServerOptimizerState("fedavgm", {"m": torch.ones(2)}),
            key_set_id=key_set.id,
            key_score=0.5 + 0.1 * round_number,
        )
        report = RoundReport(sampled=1, received=1, dropped=[], upload_bytes=10, seconds=1.0)
        stored = scoped.versions.commit_round(version, report) if ids else scoped.versions.add(version)
        ids.append(stored.id)
    package = build_package(scoped, ids[1], ids[0], key, PackagePolicy())
    devices = [f"{tenant}-device-{i}" for i in range(2)]
    nodes = [100 * (TENANTS.index(tenant) + 1) + i for i in range(2)]
    for device, node in zip(devices, nodes, strict=True):
        scoped.devices.enroll(device, tenant, Ed25519PrivateKey.generate().public_key(), node_id=node)
        scoped.devices.record_update(device, tenant=tenant, node_id=node, status="current", reason=None)
    scoped.devices.record_status_reports({devices[0]: StatusReport(wants_train=True)})
    scoped.devices.record_declines(1, [Decline(nodes[1], devices[1], "on battery")])
    scoped.devices.flag(lineage, 1, [(devices[1], "norm out of bounds")], quarantine_after=1)
    scoped.ledgers.record_privacy(lineage, 1, [PrivacySpend(devices[0], 1.5, 1e-5, 1.1, 0.01, 10, 0)])
    scoped.ledgers.record_failed_round(
        lineage, 2, RoundReport(sampled=2, received=0, dropped=[], upload_bytes=0, seconds=1.0, error="x")
    )
    scoped.ledgers.enter_phase(lineage, 3, "sampling")
    training = scoped.ledgers.enter_phase(lineage, 3, "training", total=2)
    scoped.ledgers.advance_phase(training.id, 1)
    return Written(lineage, ids, package.id, devices, nodes, key_set.id)


def _stores(storage: Storage) -> tuple[VersionStore, PackageStore, DeviceStore, LedgerStore, KeySetStore]:
    return storage.versions, storage.packages, storage.devices, storage.ledgers, storage.key_sets


@pytest.fixture
def fleets(db_url: str, tiny_spec: ModelSpec, tmp_path: Path) -> tuple[str, dict[str, Written]]:
    init_keys(tmp_path / "keys")
    key = load_signing_key(tmp_path / "keys")
    everything = Storage.open(db_url)
    return db_url, {tenant: _populate(everything, tenant, tiny_spec, key) for tenant in TENANTS}


# Each scoped read, called for the tenant that owns `mine` while `theirs` belongs to the other: the
# function returns every id, name or lineage the read exposed, which must all be the tenant's own.
READERS = {
    "VersionStore.all": lambda s, mine, theirs: [v.id for v in s.versions.all()],
    "VersionStore.latest": lambda s, mine, theirs: [
        v.id for v in (s.versions.latest(mine.lineage), s.versions.latest(theirs.lineage)) if v
    ],
    "VersionStore.get": lambda s, mine, theirs: [s.versions.get(mine.version_ids[0]).id],
    "VersionStore.chain": lambda s, mine, theirs: [v.id for v in s.versions.chain(mine.version_ids[1])],
    "VersionStore.adapter": lambda s, mine, theirs: (
        [mine.version_ids[0]] if s.versions.adapter(mine.version_ids[0]) else []
    ),
    "VersionStore.optimizer_state": lambda s, mine, theirs: (
        [mine.version_ids[1]] if s.versions.optimizer_state(mine.version_ids[1]) else []
    ),
    "VersionStore.lineage": lambda s, mine, theirs: [s.versions.lineage(mine.lineage).lineage],
    "VersionStore.best_key_score": lambda s, mine, theirs: [
        best[0]
        for best in (
            s.versions.best_key_score(mine.lineage, mine.key_set_id),
            s.versions.best_key_score(theirs.lineage, theirs.key_set_id),
        )
        if best
    ],
    "PackageStore.all": lambda s, mine, theirs: [p.id for p in s.packages.all()],
    "PackageStore.find": lambda s, mine, theirs: [
        p.id
        for p in (
            s.packages.find(mine.version_ids[1], mine.version_ids[0]),
            s.packages.find(theirs.version_ids[1], theirs.version_ids[0]),
        )
        if p
    ],
    "PackageStore.latest": lambda s, mine, theirs: [p.id for p in (s.packages.latest(),) if p],
    "PackageStore.blob": lambda s, mine, theirs: (
        [mine.package_id] if s.packages.blob(mine.package_id) else []
    ),
    "DeviceStore.enrolled": lambda s, mine, theirs: [d.device_id for d in s.devices.enrolled()],
    "DeviceStore.enrolment": lambda s, mine, theirs: [
        d.device_id
        for d in (s.devices.enrolment(mine.devices[0]), s.devices.enrolment(theirs.devices[0]))
        if d
    ],
    "DeviceStore.key": lambda s, mine, theirs: (
        [mine.devices[0]] if s.devices.key(mine.devices[0], s.devices.tenant) else []
    ),
    "DeviceStore.updates": lambda s, mine, theirs: [u.device_id for u in s.devices.updates()],
    "DeviceStore.wanting_nodes": lambda s, mine, theirs: [
        device
        for device, node in zip(mine.devices + theirs.devices, mine.nodes + theirs.nodes, strict=True)
        if node in s.devices.wanting_nodes()
    ],
    "DeviceStore.ineligible_nodes": lambda s, mine, theirs: [
        device
        for device, node in zip(mine.devices + theirs.devices, mine.nodes + theirs.nodes, strict=True)
        if node in s.devices.ineligible_nodes()
    ],
    "DeviceStore.quarantined": lambda s, mine, theirs: [
        q.device_id for q in s.devices.quarantined(released=True)
    ],
    "DeviceStore.flags": lambda s, mine, theirs: (
        [mine.devices[1]] * len(s.devices.flags(mine.devices[1]))
        + [theirs.devices[1]] * len(s.devices.flags(theirs.devices[1]))
    ),
    "LedgerStore.privacy_ledger": lambda s, mine, theirs: [e.device_id for e in s.ledgers.privacy_ledger()],
    "LedgerStore.epsilon_spent": lambda s, mine, theirs: list(s.ledgers.epsilon_spent()),
    "LedgerStore.rounds": lambda s, mine, theirs: [r.lineage for r in s.ledgers.rounds()],
    "LedgerStore.phases": lambda s, mine, theirs: [p.lineage for p in s.ledgers.phases()],
    "KeySetStore.all": lambda s, mine, theirs: [f"key set {k.id}" for k in s.key_sets.all()],
    "KeySetStore.pinned": lambda s, mine, theirs: [f"key set {k.id}" for k in (s.key_sets.pinned(),) if k],
    "KeySetStore.examples": lambda s, mine, theirs: (
        [f"key set {mine.key_set_id}"] if s.key_sets.examples(mine.key_set_id) else []
    ),
}
LISTINGS = {
    "VersionStore.all",
    "PackageStore.all",
    "DeviceStore.enrolled",
    "DeviceStore.updates",
    "DeviceStore.quarantined",
    "DeviceStore.wanting_nodes",
    "DeviceStore.ineligible_nodes",
    "LedgerStore.privacy_ledger",
    "LedgerStore.epsilon_spent",
    "LedgerStore.rounds",
    "LedgerStore.phases",
    "KeySetStore.all",
}
# Methods that write, each refused or kept to the tenant by the tests below; and the base class's.
WRITERS = {
    "VersionStore.add",
    "VersionStore.commit_round",
    "VersionStore.register_lineage",
    "VersionStore.revert",
    "VersionStore.score",
    "VersionStore.release",
    "KeySetStore.add",  # into its own tenant only: the tenant comes from the store, never the caller
    "PackageStore.add",
    "DeviceStore.enroll",
    "DeviceStore.record_update",
    "DeviceStore.record_status_reports",
    "DeviceStore.record_declines",
    "DeviceStore.flag",
    "DeviceStore.release",
    "LedgerStore.record_privacy",
    "LedgerStore.record_failed_round",
    "LedgerStore.enter_phase",
    "LedgerStore.advance_phase",
}
SCOPE_HELPERS = {"in_tenant", "is_tenant", "check_lineage", "oldest_first"}


def test_every_public_store_method_is_checked_here():
    methods = {
        f"{cls.__name__}.{name}"
        for cls in (VersionStore, PackageStore, DeviceStore, LedgerStore, KeySetStore)
        for name, _ in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in SCOPE_HELPERS
    }
    assert methods == set(READERS) | WRITERS


def _owned(written: Written) -> set[object]:
    return {
        written.lineage,
        written.package_id,
        *written.version_ids,
        *written.devices,
        f"key set {written.key_set_id}",
    }


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_tenant_reads_only_its_own_rows(fleets, reader: str):
    url, written = fleets
    for tenant, other in (TENANTS, TENANTS[::-1]):
        seen = READERS[reader](Storage.open(url, tenant), written[tenant], written[other])
        assert seen, f"{reader} showed {tenant} none of its own rows"
        assert set(seen) <= _owned(written[tenant]), f"{reader} showed {tenant} {set(seen)}"
    if reader in LISTINGS:  # unscoped (maintenance) sees both: the scoping is what hides the other's
        seen = set(READERS[reader](Storage.open(url), written["acme"], written["globex"]))
        assert seen & _owned(written["acme"]) and seen & _owned(written["globex"])


def test_another_tenants_rows_by_id_are_as_absent_as_missing_ones(fleets):
    url, written = fleets
    acme, theirs = Storage.open(url, "acme"), written["globex"]
    for read in (
        lambda: acme.versions.get(theirs.version_ids[0]),
        lambda: acme.versions.chain(theirs.version_ids[1]),
        lambda: acme.versions.adapter(theirs.version_ids[0]),
        lambda: acme.versions.optimizer_state(theirs.version_ids[1]),
        lambda: acme.versions.lineage(theirs.lineage),
        lambda: acme.packages.blob(theirs.package_id),
        lambda: acme.key_sets.examples(theirs.key_set_id),
    ):
        with pytest.raises(FleetloraError, match=r"No version|No package|no model record|No key set"):
            read()
    assert acme.versions.latest(theirs.lineage) is None
    assert acme.devices.enrolment(theirs.devices[0]) is None
    assert acme.devices.key(theirs.devices[0], "acme") is None
    assert acme.devices.flags(theirs.devices[1]) == []
    with pytest.raises(FleetloraError, match="not in quarantine"):
        acme.devices.release(theirs.devices[1], "not mine to release")
    assert theirs.devices[1] in [q.device_id for q in Storage.open(url, "globex").devices.quarantined()]


def test_a_tenant_cannot_write_into_another_tenants_lineage(fleets, tiny_spec: ModelSpec, tmp_path: Path):
    url, written = fleets
    acme, theirs = Storage.open(url, "acme"), written["globex"]
    loaded = cached_model(tiny_spec)
    report = RoundReport(sampled=1, received=1, dropped=[], upload_bytes=1, seconds=1.0)
    version = NewVersion(
        lineage=theirs.lineage,
        round=5,
        parent_id=theirs.version_ids[1],
        base_model_sha256=loaded.base_sha256,
        adapter=dict(loaded.initial_adapter),
        participants={},
        metrics={},
    )
    for write in (
        lambda: acme.versions.add(version),
        lambda: acme.versions.commit_round(version, report),
        lambda: acme.versions.revert(theirs.version_ids[0], "take it over"),
        lambda: acme.versions.score(theirs.version_ids[0], theirs.key_set_id, 1.0),
        lambda: acme.versions.release(theirs.version_ids[1], "let it through"),
        lambda: acme.ledgers.record_privacy(theirs.lineage, 3, []),
        lambda: acme.ledgers.record_failed_round(theirs.lineage, 3, report),
        lambda: acme.ledgers.enter_phase(theirs.lineage, 4, "sampling"),
        lambda: acme.devices.flag(theirs.lineage, 3, [], quarantine_after=1),
        lambda: acme.versions.register_lineage(theirs.lineage, "acme", {}, "0" * 64, 1),
        lambda: acme.devices.enroll(theirs.devices[0], "acme", Ed25519PrivateKey.generate().public_key()),
        lambda: acme.devices.enroll("new-device", "globex", Ed25519PrivateKey.generate().public_key()),
    ):
        with pytest.raises(FleetloraError, match=r"tenant|No version"):
            write()
    key = load_signing_key(tmp_path / "keys")
    with pytest.raises(FleetloraError, match="No version"):
        build_package(acme, theirs.version_ids[1], theirs.version_ids[0], key, PackagePolicy())
    # another tenant's reports and declines, even naming its devices and nodes: left alone
    acme.devices.record_status_reports({theirs.devices[1]: StatusReport(wants_train=True)})
    acme.devices.record_declines(9, [Decline(theirs.nodes[0], theirs.devices[0], "forged")])
    acme.devices.record_declines(9, [Decline(theirs.nodes[0], None, "forged")])
    assert theirs.nodes[1] not in Storage.open(url, "globex").devices.wanting_nodes()
    assert theirs.nodes[0] not in Storage.open(url, "globex").devices.ineligible_nodes()
    globex = Storage.open(url, "globex")
    their_training = globex.ledgers.phases()[-1]
    acme.ledgers.advance_phase(their_training.id, 2)  # another tenant's phase: left alone
    assert globex.ledgers.phases()[-1].done == their_training.done == 1
    assert [v.id for v in globex.versions.all()] == theirs.version_ids  # nothing was added to theirs


def test_two_tenants_training_one_model_get_two_lineages(tiny_spec: ModelSpec):
    loaded = cached_model(tiny_spec)
    assert lineage_of(loaded, "acme") != lineage_of(loaded, "globex")
    assert lineage_of(loaded, "acme") == lineage_of(loaded, "acme")
