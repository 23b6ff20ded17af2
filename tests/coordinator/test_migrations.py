"""The coordinator's schema comes from Alembic migrations, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import subprocess
import sys

import torch
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from fleetlora.coordinator.db import MIGRATIONS, Database, upgrade
from fleetlora.coordinator.models import Base
from fleetlora.coordinator.storage import NewVersion, Storage


def test_migrations_build_exactly_the_models_schema_and_are_idempotent(db_url: str):
    engine = Database(db_url).engine
    head = upgrade(engine)
    assert upgrade(engine) == head  # a second run changes nothing
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_a_database_made_before_migrations_is_adopted_with_its_data(db_url: str):
    legacy = create_engine(db_url)
    Base.metadata.tables["model_versions"].create(legacy)  # an old create_all, missing newer tables
    legacy.dispose()

    storage = Storage.open(db_url)
    version = storage.versions.add(
        NewVersion(
            lineage="L",
            parent_id=None,
            round=0,
            base_model_sha256="b" * 64,
            adapter={"w": torch.ones(2)},
            participants={},
            metrics={},
        )
    )
    assert storage.versions.latest("L") == version
    tables = set(inspect(storage.db.engine).get_table_names())
    assert {"alembic_version", "update_packages", "device_updates", "privacy_ledger"} <= tables
    storage.close()


def test_an_older_schema_is_upgraded_in_place(db_url: str):
    engine = create_engine(db_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")  # a coordinator of the first release
        connection.execute(
            text("INSERT INTO devices (device_id, tenant, public_key_pem, enrolled_at, schema_version) "
                 "VALUES ('d1', 'default', 'pem', CURRENT_TIMESTAMP, 1)")
        )  # fmt: skip
    assert upgrade(engine) == "0010"
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT device_id, node_id FROM devices")).all()
    assert [tuple(r) for r in rows] == [("d1", None)]  # kept, with the new column empty
    engine.dispose()


def test_device_reports_of_a_0009_database_read_eligible_with_nothing_else_known(db_url: str):
    engine = create_engine(db_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0009")
        connection.execute(
            text("INSERT INTO device_updates (device_id, tenant, node_id, sequence, status, wants_train, "
                 "reported_at, schema_version) VALUES ('d1', 'default', '101', 0, 'current', false, "
                 "CURRENT_TIMESTAMP, 1)")
        )  # fmt: skip
    assert upgrade(engine) == "0010"
    engine.dispose()

    devices = Storage.open(db_url).devices
    (update,) = devices.updates()
    assert (update.eligible, update.eligibility_reason, update.accelerator, update.memory_bytes) == (
        True, None, None, None,
    )  # fmt: skip
    assert (update.declined_round, update.declined_reason) == (None, None)
    assert devices.ineligible_nodes() == set()
    devices.db.close()


def test_db_upgrade_command(db_url: str):
    done = subprocess.run(
        [sys.executable, "-m", "fleetlora", "coordinator", "db", "upgrade", "--db", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "schema at revision 0010" in done.stdout
