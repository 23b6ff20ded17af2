"""Following rounds live from their stored phases (``round_phases``): what ``round start --follow``
and ``status --watch`` show.

The ServerApp writes each phase as it begins and its device counts as they change
(:mod:`.progress`); this side only reads SQL, so it can follow a run from any shell on the
coordinator host, and stopping it (Ctrl-C) leaves the run going.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fleetlora.common.terminal import duration, printable
from fleetlora.coordinator.models import utcnow
from fleetlora.coordinator.storage import LedgerStore, PhaseInfo
from fleetlora.coordinator.storage.ledgers import COMPLETED, ENDED

COUNTED = {"training": "answered", "evaluating": "answered", "distributing": "up to date"}
POLL_SECONDS = 0.5  # how often the database is read
RUN_POLL_SECONDS = 3.0  # how often the SuperLink is asked whether the run is still going (a `flwr` call)


def describe(phase: PhaseInfo) -> str:
    """One phase in words: ``round 3 training 4/5 answered`` or ``round 3 completed: v9``."""
    text = f"round {phase.round} {phase.phase}"
    if phase.total is not None:
        text += f" {phase.done}/{phase.total} {COUNTED.get(phase.phase, 'done')}"
    if phase.detail:
        text += f": {phase.detail}"
    return text


@dataclass(frozen=True)
class CurrentRound:
    """The newest round begun: where it stands, for a status line or a progress bar."""

    round: int
    phase: str
    done: int
    total: int | None
    seconds: float  # since the round began (until it ended, for an ended one)
    ended: bool
    detail: str | None

    @classmethod
    def of(cls, phases: list[PhaseInfo]) -> CurrentRound | None:
        """From the newest round's phase rows (``ledgers.phases(last_rounds=1)``); None before any."""
        if not phases:
            return None
        first, last = phases[0], phases[-1]
        until = last.finished_at if last.phase in ENDED else None
        seconds = ((until or utcnow()) - first.started_at).total_seconds()
        return cls(last.round, last.phase, last.done, last.total, seconds, last.phase in ENDED, last.detail)

    def as_row(self) -> dict[str, object]:
        """As a row of ``status`` (JSON-safe: the elapsed time in seconds)."""
        return {
            "round": self.round,
            "phase": self.phase,
            "done": self.done if self.total is not None else None,
            "total": self.total,
            "elapsed_seconds": round(self.seconds, 1),
            "detail": self.detail or "",
        }


class PhaseView:
    """Prints each phase once it ends (with its time) and keeps a bar on the one in progress."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.run_task: TaskID = self.progress.add_task("rounds", total=rounds)
        self.phase_task: TaskID = self.progress.add_task("waiting for the first round", total=None)
        self.printed: set[int] = set()
        self.rounds_done = 0

    def __enter__(self) -> PhaseView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, phases: list[PhaseInfo]) -> None:
        for phase in phases:
            ended = phase.finished_at is not None
            if ended and phase.id not in self.printed:
                self.printed.add(phase.id)
                timing = "" if phase.phase in ENDED else f" ({duration(phase.seconds)})"
                style = {COMPLETED: "green", "failed": "red"}.get(phase.phase, "")
                line = printable(describe(phase) + timing)  # a detail may hold any text a database held
                self.progress.console.print(line, style=style or None, markup=False)
                if phase.phase in ENDED:
                    self.rounds_done += 1
        self.progress.update(self.run_task, completed=self.rounds_done)
        current = next((p for p in reversed(phases) if p.finished_at is None), None)
        if current is not None:
            self.progress.update(
                self.phase_task,
                description=f"round {current.round} {current.phase}",
                total=current.total,
                completed=current.done,
            )


def follow_run(
    ledgers: LedgerStore,
    run_id: int,
    rounds: int,
    run_status: Callable[[], str],
    console: Console,
    *,
    poll: float = POLL_SECONDS,
    run_poll: float = RUN_POLL_SECONDS,
) -> str:
    """Show run ``run_id``'s phases until the SuperLink reports it finished; its final status."""
    status, asked = "", 0.0
    with PhaseView(console, rounds) as view:
        while True:
            view.show(ledgers.phases(run_id=run_id))
            if time.monotonic() - asked >= run_poll:
                status, asked = run_status(), time.monotonic()
                if status.startswith("finished"):
                    view.show(ledgers.phases(run_id=run_id))  # what was written before it ended
                    return status
            time.sleep(poll)
