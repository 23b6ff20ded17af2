"""Following a run from its stored phases: each phase printed once as it ends, the run's end reported."""

from __future__ import annotations

import io
import threading
import time

from rich.console import Console

from fleetlora.coordinator.follow import CurrentRound, describe, follow_run
from fleetlora.coordinator.storage import LedgerStore, Storage

LINEAGE = "f" * 64


def _ledgers(url: str) -> LedgerStore:
    storage = Storage.open(url, "default")
    storage.versions.register_lineage(LINEAGE, "default", {}, "0" * 64, 1)
    return storage.ledgers


def _one_round(ledgers: LedgerStore, number: int, run_id: int, *, fail: bool = False) -> None:
    ledgers.enter_phase(LINEAGE, number, "sampling", run_id=run_id)
    training = ledgers.enter_phase(LINEAGE, number, "training", run_id=run_id, total=3)
    for done in (1, 2, 3):
        ledgers.advance_phase(training.id, done)
    if fail:
        ledgers.enter_phase(LINEAGE, number, "failed", run_id=run_id, detail="1 valid deltas, 2 needed")
        return
    ledgers.enter_phase(LINEAGE, number, "aggregating", run_id=run_id)
    ledgers.enter_phase(LINEAGE, number, "completed", run_id=run_id, detail=f"v{number + 1}")


def test_follow_prints_every_phase_once_and_returns_the_runs_end(sqlite_url: str):
    ledgers = _ledgers(sqlite_url)
    _one_round(ledgers, 1, run_id=9)
    _one_round(ledgers, 7, run_id=2**64 - 1)  # another run's round (Flower's ids are 64-bit unsigned)
    statuses = iter(["running", "running", "finished:completed"])

    def second_round_then_end() -> str:
        status = next(statuses)
        if status == "finished:completed":
            _one_round(ledgers, 2, run_id=9, fail=True)  # written just before the run ended
        return status

    out = io.StringIO()
    status = follow_run(
        ledgers, 9, 2, second_round_then_end, Console(file=out, width=100), poll=0.01, run_poll=0.02
    )

    assert status == "finished:completed"
    lines = [line for line in out.getvalue().splitlines() if line.startswith("round")]
    assert [" ".join(line.split()[:3]) for line in lines] == [
        "round 1 sampling",
        "round 1 training",
        "round 1 aggregating",
        "round 1 completed:",
        "round 2 sampling",
        "round 2 training",
        "round 2 failed:",
    ]
    assert "round 1 training 3/3 answered (" in lines[1]
    assert lines[3] == "round 1 completed: v2" and lines[-1] == "round 2 failed: 1 valid deltas, 2 needed"
    assert "round 7" not in out.getvalue()
    assert {(p.round, p.run_id) for p in ledgers.phases(run_id=2**64 - 1)} == {(7, 2**64 - 1)}


def test_a_phase_in_progress_is_shown_after_it_ends(sqlite_url: str):
    ledgers = _ledgers(sqlite_url)
    ledgers.enter_phase(LINEAGE, 1, "sampling", run_id=3)
    training = ledgers.enter_phase(LINEAGE, 1, "training", run_id=3, total=2)
    out = io.StringIO()
    ended = threading.Event()

    def finish_later() -> None:
        time.sleep(0.2)
        ledgers.advance_phase(training.id, 2)
        ledgers.enter_phase(LINEAGE, 1, "completed", run_id=3, detail="v2")
        ended.set()

    threading.Thread(target=finish_later).start()
    status = follow_run(
        ledgers, 3, 1, lambda: "finished:completed" if ended.is_set() else "running",
        Console(file=out, width=100), poll=0.01, run_poll=0.01,
    )  # fmt: skip
    assert status == "finished:completed"
    assert out.getvalue().count("round 1 training 2/2 answered") == 1


def test_current_round_reads_the_newest_rounds_phases(sqlite_url: str):
    ledgers = _ledgers(sqlite_url)
    assert CurrentRound.of(ledgers.phases(last_rounds=1)) is None
    _one_round(ledgers, 1, run_id=1)
    ledgers.enter_phase(LINEAGE, 2, "sampling", run_id=1)
    training = ledgers.enter_phase(LINEAGE, 2, "training", run_id=1, total=5)
    ledgers.advance_phase(training.id, 4)

    current = CurrentRound.of(ledgers.phases(last_rounds=1))

    assert current is not None
    assert (current.round, current.phase, current.done, current.total) == (2, "training", 4, 5)
    assert not current.ended and (current.as_row()["done"], current.as_row()["total"]) == (4, 5)
    assert [p.round for p in ledgers.phases(last_rounds=2)] == [1] * 4 + [2] * 2
    assert ledgers.phases(last_rounds=0) == []


def test_a_phase_reads_as_a_person_would_say_it(sqlite_url: str):
    ledgers = _ledgers(sqlite_url)
    ledgers.enter_phase(LINEAGE, 4, "sampling")
    distributing = ledgers.enter_phase(LINEAGE, 4, "distributing", total=5)
    ledgers.advance_phase(distributing.id, 5)
    assert describe(ledgers.phases()[-1]) == "round 4 distributing 5/5 up to date"
