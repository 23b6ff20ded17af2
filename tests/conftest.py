"""Shared fixtures: the tiny model spec, databases, and the shared data sets when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetlora.common.config import ModelSpec
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def builtin_labels() -> tuple[str, ...]:
    return labels_of(load_examples("builtin"))


@pytest.fixture(scope="session")
def tiny_spec(builtin_labels: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(name="tiny", task="classify", labels=builtin_labels, max_length=32)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture(scope="session")
def banking77() -> Path:
    folder = SHARED_DATA / "banking77"
    if not (folder / "train.csv").is_file():
        pytest.skip(f"BANKING77 not found at {folder}: this test needs ../shared/data beside the repo.")
    return folder
