"""Shared fixtures: the tiny model spec, databases, and the shared data sets when present."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from fleetlora.common.config import ModelSpec
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# One OpenMP thread per process (none of the imports above loads torch, which reads this once). `make test`
# runs pytest-xdist workers that start fleets and simulations of their own on 2 cores: with torch's thread
# per core they spun against each other and an in-process training test took 5-20x as long. Every
# subprocess a test starts inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, otherwise in file order: `make test`'s pytest-xdist workers, handed one test
    at a time, then start the long ones together instead of one worker finishing the last alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def builtin_labels() -> tuple[str, ...]:
    return labels_of(load_examples("builtin"))


@pytest.fixture(scope="session")
def tiny_spec(builtin_labels: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(name="tiny", task="classify", labels=builtin_labels, max_length=32)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# The PostgreSQL server the SQL tests also run against; `.ci/run` starts (or installs) it.
POSTGRES_ADMIN_URL = os.environ.get(
    "FLEETLORA_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The coordinator database on SQLite, then on a fresh PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"fleetlora_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc.orig}); start it "
            "(`.ci/run` does) or point FLEETLORA_TEST_POSTGRES at one."
        )
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def banking77() -> Path:
    folder = SHARED_DATA / "banking77"
    if not (folder / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {folder}: this test needs ../shared/data beside the repo.")
    return folder
