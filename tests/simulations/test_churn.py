"""Churn: devices that never answer and stragglers (simulations/churn.py), against over-selection.

The round loop is the real one over real ClientApps (an in-process grid); the last test runs the same
on Flower's Simulation Engine as a researcher would.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fleetlora.client.client_app import build_client_app
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.simulations.churn import Churn, ChurnGrid
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config
from tests.simulations.test_simulate_cli import fleetlora


def test_each_device_s_fate_follows_seed_round_and_device():
    churn = Churn(dropout=0.3, stragglers=0.2, seed=1)
    fates = Counter(churn.fate(3, f"partition-{i}") for i in range(4000))
    assert fates["lost"] / 4000 == pytest.approx(0.3, abs=0.03)
    assert fates["late"] / 4000 == pytest.approx(0.2, abs=0.03)
    again = [churn.fate(3, f"partition-{i}") for i in range(50)]
    assert again == [Churn(dropout=0.3, stragglers=0.2, seed=1).fate(3, f"partition-{i}") for i in range(50)]
    assert again != [churn.fate(4, f"partition-{i}") for i in range(50)]  # another round, other devices


def _fleet(tmp_path: Path, churn: Churn, **config) -> tuple[list, ChurnGrid]:
    run_config = _run_config(f"sqlite:///{tmp_path / 'fleet.db'}", **config)
    grid = ChurnGrid(LocalGrid(build_client_app(), 10, run_config), churn)
    return Federation(grid, CoordinatorSettings.from_run_config(run_config)).run(), grid


def _missing(grid: ChurnGrid, fate: str) -> Counter:
    """How many of each round's devices the network lost (or delayed)."""
    return Counter(round_number for round_number, _ in (grid.lost if fate == "lost" else grid.late))


@pytest.mark.slow
def test_with_30_percent_dropout_over_selection_loses_no_round_that_had_its_quorum(tmp_path: Path):
    # 4 deltas needed a round, 8 sampled (over-select 1.0), 3 in 10 lost: a round completes exactly when at
    # least 4 of its 8 answer, and closes as soon as it has them.
    outcomes, grid = _fleet(
        tmp_path,
        Churn(dropout=0.3, seed=1),
        **{"rounds": 4, "devices-per-round": 4, "min-devices": 4, "over-select": 1.0, "round-deadline": 30.0},
    )

    lost = _missing(grid, "lost")
    assert sum(lost.values()) > 0  # the network did lose devices
    for outcome in outcomes:
        assert len(outcome.sampled_devices) == 8
        answered = 8 - lost[outcome.round]
        assert (outcome.version is not None) is (answered >= 4), (outcome.round, answered, outcome.error)
    assert all(o.version is not None for o in outcomes)  # with this seed every round had its quorum
    reasons = Counter(d.reason for o in outcomes for d in o.drops)
    assert reasons["not waited for: the round had enough"] > 0


@pytest.mark.slow
def test_without_over_selection_the_same_dropout_loses_every_round_it_touches(tmp_path: Path):
    # The control: 4 sampled, 4 needed; a round missing any of its 4 fails at its deadline.
    outcomes, grid = _fleet(
        tmp_path,
        Churn(dropout=0.3, seed=1),
        **{"rounds": 4, "devices-per-round": 4, "min-devices": 4, "round-deadline": 10.0},
    )
    lost = _missing(grid, "lost")
    assert all((o.version is None) is (lost[o.round] > 0) for o in outcomes)
    assert any(o.version is None for o in outcomes)


@pytest.mark.slow
def test_an_over_selected_round_closes_at_quorum_rather_than_wait_for_stragglers(tmp_path: Path):
    # Stragglers answer 600 s late; 3 needed of 6 sampled. A round with 3 on time closes at once.
    outcomes, grid = _fleet(
        tmp_path,
        Churn(stragglers=0.4, straggler_seconds=600.0, seed=2),
        **{"rounds": 3, "devices-per-round": 3, "min-devices": 3, "over-select": 1.0, "round-deadline": 20.0},
    )
    late = _missing(grid, "late")
    assert sum(late.values()) > 0
    on_time = [o for o in outcomes if 6 - late[o.round] >= 3]
    assert on_time and all(o.version is not None and o.seconds < 15 for o in on_time)
    reasons = Counter(d.reason for o in on_time for d in o.drops)
    assert reasons["not waited for: the round had enough"] >= sum(late[o.round] for o in on_time)


@pytest.mark.slow
def test_a_simulated_fleet_with_dropout_and_over_selection_on_the_engine(tmp_path: Path):
    out = tmp_path / "run"
    done = fleetlora(
        "simulate", "--model", "tiny", "--devices", "10", "--devices-per-round", "3", "--over-select", "1.0",
        "--simulated-dropout", "0.3", "--rounds", "3", "--round-deadline", "120", "--seed", "3",
        "--partition", "iid", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert all(r["version"] is not None and r["participants"] >= 3 for r in results["rounds"])
    memory = results["memory"]  # the engine's Ray processes are counted with this one
    assert memory["processes_at_peak"] >= 2 and memory["tree_peak_mb"] > 0 and memory["process_peak_mb"] > 0
