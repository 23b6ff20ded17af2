"""The class-incremental scenario: phases of new intents reach devices through their corpus, and the
versions that close each phase are scored on every phase's intents."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetlora.client.client_app import build_client_app
from fleetlora.client.corpus.store import CORPUS_FILE, CorpusStore
from fleetlora.common.data import load_examples
from fleetlora.common.data.examples import labels_of
from fleetlora.common.data.partition import phase_labels, phase_of_round
from fleetlora.common.errors import ConfigError, DataError
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.simulations.scenario import PhaseVersions, incremental_settings, retention, score_phases
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config

LABELS = tuple(f"intent_{i}" for i in range(10))


def test_phases_split_every_label_once_in_near_equal_seeded_groups():
    phases = phase_labels(LABELS, 3, seed=1)

    assert sorted(label for group in phases for label in group) == sorted(LABELS)
    assert [len(group) for group in phases] == [4, 3, 3]
    assert phase_labels(LABELS, 3, seed=1) == phases and phase_labels(LABELS, 3, seed=2) != phases
    assert all(list(group) == sorted(group, key=LABELS.index) for group in phases)  # the labels' order
    with pytest.raises(ConfigError, match="stream-phases"):
        phase_labels(LABELS, 11, seed=1)


@pytest.mark.parametrize(("round_number", "phase"), [(1, 1), (3, 1), (4, 2), (9, 3), (12, 3)])
def test_rounds_fall_in_their_phase_and_later_rounds_stay_in_the_last(round_number: int, phase: int):
    assert phase_of_round(round_number, phase_rounds=3, phases=3) == phase


def test_each_phase_brings_its_intents_to_the_devices_and_the_closing_versions_are_scored(
    tmp_path: Path, sqlite_url: str
):
    config = _run_config(
        sqlite_url,
        **{"stream-phases": 2, "phase-rounds": 1, "device-state": str(tmp_path), "rounds": 1},
        **{"min-devices": 3, "local-steps": 3},
    )
    grid = LocalGrid(build_client_app(), 3, config)
    settings = CoordinatorSettings.from_run_config(config)
    versions = PhaseVersions()
    first, second = phase_labels(settings.spec.labels, 2, settings.spec.seed)

    Federation(grid, settings, observer=versions).run()
    held_after_one = [_stored_labels(tmp_path / f"partition-{i}") for i in range(3)]
    Federation(grid, settings, observer=versions).run()  # round 2: the second phase begins
    held_after_two = [_stored_labels(tmp_path / f"partition-{i}") for i in range(3)]

    assert all(held and held <= set(first) for held in held_after_one)
    assert all(held - set(first) and held <= set(first) | set(second) for held in held_after_two)
    scored = score_phases(settings, versions, phases=2, phase_rounds=1)
    assert [row["phase"] for row in scored["phases"]] == [1, 2]
    assert all(0.0 <= a <= 1.0 for row in scored["phases"] for a in row["accuracy_by_phase"])
    assert scored["retention"]["mean"] is not None


def test_retention_divides_each_earlier_phase_after_the_last_by_right_after_it_was_learned():
    rows = [
        {"accuracy_by_phase": [0.8, 0.1, 0.0]},
        {"accuracy_by_phase": [0.6, 0.9, 0.1]},
        {"accuracy_by_phase": [0.4, 0.45, 0.9]},
    ]

    kept = retention(rows)

    assert kept["first"] == pytest.approx(0.5) and kept["mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert retention(rows[:1]) == {"mean": None, "first": None}


def test_the_scenario_pins_the_first_phases_test_intents_and_refuses_a_mismatched_round_count(tmp_path: Path):
    settings = incremental_settings({"data": "builtin", "stream-phases": 2, "phase-rounds": 2}, tmp_path)

    assert settings["rounds"] == 4 and settings["eval-data"] == "builtin-test"
    first = set(phase_labels(labels_of(load_examples("builtin")), 2, 0)[0])
    key_set = load_examples(tmp_path / "scenario" / "key-set.csv")
    assert key_set and {e.label for e in key_set} == first
    with pytest.raises(ConfigError, match="leave --rounds out"):
        incremental_settings({"data": "builtin", "stream-phases": 2, "rounds": 5}, tmp_path)


def test_any_labelled_file_is_split_into_training_and_test_by_text_hash(tmp_path: Path):
    data = tmp_path / "intents.csv"
    data.write_text("text,label\n" + "".join(f"request number {i} please,l{i % 3}\n" for i in range(60)))

    settings = incremental_settings({"data": str(data), "stream-phases": 3}, tmp_path)

    train, test = load_examples(str(settings["data"])), load_examples(str(settings["eval-data"]))
    assert len(train) + len(test) == 60 and not {e.text for e in train} & {e.text for e in test}


def _stored_labels(device: Path) -> set[str]:
    with CorpusStore(device / CORPUS_FILE) as store:
        return {r.label for r in store.window() if r.label}


def test_a_key_set_that_cannot_be_read_is_refused_before_the_engine_starts(tmp_path: Path):
    from fleetlora.simulations.runner import SimulationConfig, preflight

    config = SimulationConfig(out=tmp_path, settings={"model": "tiny", "key-set": str(tmp_path / "gone.csv")})

    with pytest.raises(DataError, match=r"gone\.csv"):
        preflight(config)


def test_more_phases_than_labels_are_refused_before_the_engine_starts(tmp_path: Path):
    from fleetlora.simulations.runner import SimulationConfig, preflight

    config = SimulationConfig(out=tmp_path, settings={"model": "tiny", "stream-phases": 11})

    with pytest.raises(ConfigError, match="stream-phases must be between 1 and the 10 labels"):
        preflight(config)
