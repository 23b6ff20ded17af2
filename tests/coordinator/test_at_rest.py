"""Adapters, optimizer states and packages are sealed at rest (coordinator/at_rest.py): a database copy holds
no adapter in the clear, a moved or flipped blob fails with a clear error, and keys rotate resumably."""

from __future__ import annotations

import base64
from pathlib import Path

import pyotp
import pytest
import torch
from sqlalchemy import text
from typer.testing import CliRunner

from fleetlora.common.delta import serialize
from fleetlora.coordinator.at_rest import KEY_ENV, KEY_FILE_ENV, AtRestKey, BlobCipher, SealedBlobError
from fleetlora.coordinator.cli import app
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.packages import PackagePolicy, build_package
from fleetlora.coordinator.storage import (
    NewVersion,
    PackageStore,
    ServerOptimizerState,
    VersionStore,
)
from fleetlora.coordinator.storage.reseal import reseal_all
from tests.client.update_harness import make_fleet

ADAPTER = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def _stores(url: str, *keys: AtRestKey) -> tuple[Database, VersionStore]:
    db = Database(url, BlobCipher(keys)).initialize()
    return db, VersionStore(db)


def _add(versions: VersionStore, round_number: int = 0, value: float = 0.0):
    return versions.add(
        NewVersion(
            lineage="L", round=round_number, parent_id=None, base_model_sha256="b" * 64,
            adapter={"w": ADAPTER["w"] + value}, participants={}, metrics={},
            optimizer=ServerOptimizerState("fedavgm", {"m/w": torch.ones(2, 3)}),
        )
    )  # fmt: skip


def _stored(db: Database, statement: str) -> bytes:
    with db.engine.connect() as connection:
        return bytes(connection.execute(text(statement)).scalar_one())


def _key(tmp_path: Path, name: str = "at-rest.key") -> AtRestKey:
    return AtRestKey.create(tmp_path / "keys" / name)


def test_a_database_copy_holds_no_adapter_in_the_clear(db_url: str, tmp_path: Path):
    db, versions = _stores(db_url, _key(tmp_path))
    version = _add(versions)

    stored = _stored(db, f"SELECT adapter FROM model_versions WHERE id = {version.id}")
    assert serialize(ADAPTER) not in stored and stored.startswith(b"FLAR1")
    assert serialize({"m/w": torch.ones(2, 3)}) not in _stored(db, "SELECT state FROM optimizer_states")
    assert torch.equal(versions.adapter(version.id)["w"], ADAPTER["w"])  # and reads back whole
    assert versions.optimizer_state(version.id).state["m/w"].sum() == 6
    assert version.adapter_sha256  # the recorded hash is of the adapter itself, as devices see it


def test_a_blob_moved_to_another_row_or_flipped_fails_with_a_clear_error(db_url: str, tmp_path: Path):
    db, versions = _stores(db_url, _key(tmp_path))
    first, second = _add(versions), _add(versions, 1, value=1.0)
    with db.engine.begin() as connection:  # the second version's row now holds the first's sealed blob
        connection.execute(
            text(
                "UPDATE model_versions SET adapter = (SELECT adapter FROM model_versions WHERE id = :a) "
                "WHERE id = :b"
            ),
            {"a": first.id, "b": second.id},
        )
    with pytest.raises(SealedBlobError, match="moved here from another row"):
        versions.adapter(second.id)

    blob = bytearray(_stored(db, f"SELECT adapter FROM model_versions WHERE id = {first.id}"))
    blob[-3] ^= 0x01
    with db.engine.begin() as connection:
        connection.execute(
            text("UPDATE model_versions SET adapter = :b WHERE id = :i"), {"b": bytes(blob), "i": first.id}
        )
    with pytest.raises(SealedBlobError, match="damaged"):
        versions.adapter(first.id)


def test_a_process_without_the_key_is_told_which_key_and_how_to_give_it(db_url: str, tmp_path: Path):
    key = _key(tmp_path)
    _, versions = _stores(db_url, key)
    version = _add(versions)

    _, keyless = _stores(db_url)
    with pytest.raises(SealedBlobError, match=f"under key {key.key_id.hex()}.*{KEY_FILE_ENV}"):
        keyless.adapter(version.id)


def test_packages_are_sealed_and_bound_to_their_row(sqlite_url: str, tmp_path: Path, tiny_spec, monkeypatch):
    key = _key(tmp_path)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "keys" / "at-rest.key"))
    fleet = make_fleet(tmp_path / "fleet", tiny_spec, sqlite_url)  # a real lineage, its packages signed

    info = build_package(fleet.storage, fleet.versions[1].id, None, fleet.key, PackagePolicy())

    stored = _stored(fleet.storage.db, f"SELECT package FROM update_packages WHERE id = {info.id}")
    assert stored.startswith(b"FLAR1") and stored[5:13] == key.key_id
    assert len(PackageStore(fleet.storage.db).blob(info.id)) == info.package_bytes


def test_rotation_rewrites_every_blob_and_resumes_after_a_kill(db_url: str, tmp_path: Path, monkeypatch):
    old, new = _key(tmp_path, "old.key"), _key(tmp_path, "new.key")
    db, versions = _stores(db_url, old)
    made = [_add(versions, i, value=float(i)) for i in range(4)]

    # Killed after two rows: those two are under the new key, the rest still under the old.
    cipher = BlobCipher([new, old])
    real_seal, calls = BlobCipher.seal, []

    def dies_on_the_third(self, blob, binding):
        calls.append(binding)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_seal(self, blob, binding)

    monkeypatch.setattr(BlobCipher, "seal", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        reseal_all(db, cipher)
    monkeypatch.setattr(BlobCipher, "seal", real_seal)
    assert reseal_all(db, cipher) == {
        "model_versions": 2, "optimizer_states": 4, "update_packages": 0, "operators": 0, "key_sets": 0
    }  # fmt: skip

    _, only_new = _stores(db_url, new)  # the old key is no longer needed
    for i, version in enumerate(made):
        assert torch.equal(only_new.adapter(version.id)["w"], ADAPTER["w"] + i)
    assert set(reseal_all(db, cipher).values()) == {0}


def test_the_cli_makes_a_key_and_turns_encryption_on_for_clear_blobs(
    db_url: str, tmp_path: Path, monkeypatch
):
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    db, clear = _stores(db_url)
    version = _add(clear)
    assert serialize(ADAPTER) in _stored(db, f"SELECT adapter FROM model_versions WHERE id = {version.id}")
    runner = CliRunner()
    key_file = tmp_path / "keys" / "at-rest.key"

    made = runner.invoke(app, ["keys", "init-at-rest", "--out", str(key_file)])
    assert (
        made.exit_code == 0
        and KEY_FILE_ENV in made.output
        and oct(key_file.stat().st_mode & 0o777) == "0o600"
    )
    rotated = runner.invoke(app, ["db", "rotate-key", "--new-key", str(key_file), "--db", db_url])
    assert rotated.exit_code == 0, rotated.output

    assert _stored(db, f"SELECT adapter FROM model_versions WHERE id = {version.id}").startswith(b"FLAR1")
    monkeypatch.setenv(
        KEY_ENV, base64.b64encode(key_file.read_bytes()).decode()
    )  # the key, from the environment
    assert torch.equal(VersionStore(Database(db_url).initialize()).adapter(version.id)["w"], ADAPTER["w"])


def test_with_a_key_a_blob_written_in_the_clear_around_the_coordinator_is_refused(
    db_url: str, tmp_path: Path
):
    db, versions = _stores(db_url, _key(tmp_path))
    version = _add(versions)
    with db.engine.begin() as connection:  # someone who can write the database swaps in their own adapter
        update = text("UPDATE model_versions SET adapter = :b WHERE id = :i")
        connection.execute(update, {"b": serialize({"w": torch.full((2, 3), 9.0)}), "i": version.id})

    with pytest.raises(SealedBlobError, match="stored in the clear although this coordinator seals"):
        versions.adapter(version.id)


def test_rotation_takes_the_operators_secrets_along(db_url: str, tmp_path: Path):
    from fleetlora.coordinator.operators import Credentials, Operators

    old, new = _key(tmp_path, "old.key"), _key(tmp_path, "new.key")
    db, _ = _stores(db_url, old)
    added = Operators(db).add("alice", tmp_path / "alice.key")

    reseal_all(db, BlobCipher([new, old]))

    only_new, _ = _stores(db_url, new)  # the old key gone: alice can still prove herself
    code = pyotp.TOTP(added.secret).now()
    assert Operators(only_new).authorize(Credentials("alice", added.key_file, code), "x") == "alice"
