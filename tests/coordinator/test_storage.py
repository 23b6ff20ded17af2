import pytest
import torch
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from fleetlora.common.delta import serialize, sha256_hex
from fleetlora.common.errors import ConfigError, CorruptVersionError
from fleetlora.coordinator.db import Database
from fleetlora.coordinator.storage import VersionStore


def _versions(url: str) -> VersionStore:
    return VersionStore(Database(url).initialize())


def _add(versions: VersionStore, parent: int | None, round_number: int, value: float, lineage: str = "L"):
    return versions.add(
        lineage=lineage,
        parent_id=parent,
        round_number=round_number,
        base_model_sha256="b" * 64,
        adapter={"w": torch.full((4, 2), value)},
        participants={"11": 30, "12": 10} if parent else {},
        metrics={"central_loss": 1.0 / (round_number + 1)},
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
