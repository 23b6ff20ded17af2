"""The audit log (coordinator/storage/audit.py): every change is an entry in a hash chain, and every way of
tampering with the rows or the signed checkpoints is detected by `fleetlora coordinator audit verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import text
from typer.testing import CliRunner

from fleetlora.common.keys import read_public_key
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.keys import init_keys, load_signing_key
from fleetlora.coordinator.storage import NewVersion, Storage
from fleetlora.coordinator.storage.audit import CHECKPOINTS_FILE, read_checkpoints, verify


def _version(parent: int | None, round_number: int, value: float) -> NewVersion:
    return NewVersion(
        lineage="L", round=round_number, parent_id=parent, base_model_sha256="b" * 64,
        adapter={"w": torch.full((2,), value)}, participants={}, metrics={},
    )  # fmt: skip


@pytest.fixture
def audited(db_url: str, tmp_path: Path) -> tuple[Storage, Path]:
    """A database with one of each audited change, a checkpoint after the first three and one at the end."""
    keys = tmp_path / "keys"
    init_keys(keys)
    storage = Storage.open(db_url)
    storage.versions.register_lineage("L", "default", {"name": "tiny"}, "b" * 64, 1000)
    v1 = storage.versions.add(_version(None, 0, 0.0))
    v2 = storage.versions.add(_version(v1.id, 1, 1.0))
    storage.audit.checkpoint(load_signing_key(keys), keys)
    storage.devices.enroll("phone-1", "default", Ed25519PrivateKey.generate().public_key())
    storage.devices.flag("L", 2, [("phone-1", "delta norm 1e9 above the round's bound")], quarantine_after=1)
    storage.devices.release("phone-1", "reflashed")
    storage.versions.revert(v1.id, "v2 was worse")
    assert v2.id
    storage.audit.checkpoint(load_signing_key(keys), keys)
    return storage, keys


def _problems(storage: Storage, keys: Path) -> list[str]:
    key = read_public_key(keys / "coordinator-signing.pub", Ed25519PublicKey)
    return verify(
        storage.audit.entries(), storage.audit.head(), read_checkpoints(keys / CHECKPOINTS_FILE), key
    )


def _sql(storage: Storage, statement: str, **params) -> None:
    with storage.db.engine.begin() as connection:
        connection.execute(text(statement), params)


def test_every_change_is_an_entry_and_an_untouched_log_verifies(audited: tuple[Storage, Path]):
    storage, keys = audited
    actions = [e.action for e in storage.audit.entries()]

    assert actions == [
        "lineage.registered", "version.created", "version.created", "audit.checkpoint", "device.enrolled",
        "device.quarantined", "device.released", "version.reverted", "audit.checkpoint",
    ]  # fmt: skip
    reverted = json.loads(storage.audit.entries()[7].details)
    assert reverted["reason"] == "v2 was worse" and reverted["reverted_to"] == 1
    assert _problems(storage, keys) == []


@pytest.mark.parametrize(
    ("tamper", "detected"),
    [
        ("edit", "entry 5's content does not match its hash (edited)"),
        ("delete", "stands where entry 5 belongs"),
        ("insert", "entry 5 does not follow the entry before it"),
        ("reorder", "does not follow the entry before it"),
        ("truncate", "checkpoint 2 signed entry 8, but the log ends at entry 6"),
        ("restore-older", "checkpoint 2 signed entry 8, but the log ends at entry 3"),
    ],
)
def test_tampering_with_the_rows_is_detected(audited: tuple[Storage, Path], tamper: str, detected: str):
    storage, keys = audited
    entries = storage.audit.entries()
    if tamper == "edit":
        _sql(storage, "UPDATE audit_log SET details = :d WHERE seq = 5", d='{"tenant":"other"}')
    elif tamper == "delete":
        _sql(storage, "DELETE FROM audit_log WHERE seq = 5")
    elif tamper == "insert":  # a made-up entry with its own valid hash, slipped in as entry 5
        _sql(storage, "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 5")
        _sql(storage, "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 105")
        forged = entries[4]
        _sql(
            storage,
            "INSERT INTO audit_log VALUES (5, :at, 'intruder', 'device.enrolled', 'evil', '{}', :prev, :h)",
            at=forged.at, prev="f" * 64, h="e" * 64,
        )  # fmt: skip
    elif tamper == "reorder":  # swap entries 5 and 6
        _sql(storage, "UPDATE audit_log SET seq = 100 WHERE seq = 5")
        _sql(storage, "UPDATE audit_log SET seq = 5 WHERE seq = 6")
        _sql(storage, "UPDATE audit_log SET seq = 6 WHERE seq = 100")
    else:  # drop the newest rows and make the head agree, so the chain left is whole
        keep = 6 if tamper == "truncate" else 3
        _sql(storage, "DELETE FROM audit_log WHERE seq > :k", k=keep)
        _sql(
            storage, "UPDATE audit_head SET seq = :k, entry_hash = :h", k=keep, h=entries[keep - 1].entry_hash
        )

    problems = _problems(storage, keys)

    assert any(detected in p for p in problems), problems


@pytest.mark.parametrize(
    ("tamper", "detected"),
    [
        ("replay", "checkpoint 3 (entry 3) follows a later one (replayed or reordered)"),
        ("roll-back", "records a checkpoint of entry 8 that the checkpoint file does not hold"),
        ("forge", "checkpoint 2 (entry 8) has a bad signature"),
        ("garbage", "checkpoint line 2 is not a checkpoint"),
    ],
)
def test_tampering_with_the_checkpoints_is_detected(
    audited: tuple[Storage, Path], tamper: str, detected: str
):
    storage, keys = audited
    path = keys / CHECKPOINTS_FILE
    lines = path.read_text().splitlines()
    if tamper == "replay":
        lines.append(lines[0])
    elif tamper == "roll-back":
        lines = lines[:1]
    elif tamper == "forge":
        document = json.loads(lines[1])
        document["entry_hash"] = "0" * 64
        lines[1] = json.dumps(document)
    else:
        lines[1] = "not json"
    path.write_text("\n".join(lines) + "\n")

    assert any(detected in p for p in _problems(storage, keys)), _problems(storage, keys)


def test_audit_verify_exits_non_zero_and_names_the_problem(audited: tuple[Storage, Path], db_url: str):
    storage, keys = audited
    runner = CliRunner()
    whole = runner.invoke(app, ["audit", "verify", "--keys", str(keys), "--db", db_url])
    assert whole.exit_code == 0 and "audit log whole: 9 entries, 2 signed checkpoints hold" in whole.output

    _sql(storage, "UPDATE audit_log SET actor = 'someone else' WHERE seq = 2")
    broken = runner.invoke(app, ["audit", "verify", "--keys", str(keys), "--db", db_url])

    assert broken.exit_code == 1 and "entry 2's content does not match its hash (edited)" in broken.output
    listed = runner.invoke(app, ["audit", "list", "--db", db_url], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "device.quarantined" in listed.output


def _append_many(url: str, worker: int, count: int) -> None:
    """One coordinator process recording ``count`` changes as fast as it can."""
    audit = Storage.open(url).audit
    for i in range(count):
        audit.record("setting.changed", f"worker {worker}", {"i": i})


def test_processes_appending_at_once_lose_no_change_and_keep_one_chain(db_url: str):
    """Four processes each audit 50 changes at the same time: none is refused, the chain stays whole.

    On SQLite a deferred BEGIN let two appenders read the same head and the second's change fail with
    "database is locked" or a duplicate number; coordinator/db.py begins SQLite transactions IMMEDIATE.
    """
    import multiprocessing

    Storage.open(db_url).close()  # the schema, once; no connection left open for the children to inherit
    context = multiprocessing.get_context("fork")  # each child opens its own engine
    workers = [context.Process(target=_append_many, args=(db_url, w, 50)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    storage = Storage.open(db_url)
    entries = storage.audit.entries()
    assert [e.seq for e in entries] == list(range(1, 201))
    assert verify(entries, storage.audit.head(), [], None) == []
