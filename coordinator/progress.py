"""A round's progress as it happens: each phase stored in SQL and logged as one structured line.

The stored phases (``round_phases``) are what ``coordinator round start --follow``, ``status
--watch``, the console and the metrics read; the log line (logger ``fleetlora.coordinator.rounds``,
fields in ``extra``) is what ``flwr log RUN_ID`` and the coordinator's own log show. Progress is
information, not state: a write that fails is logged and the round goes on (its commit is what
counts, and a database that is really gone fails the round there).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import SQLAlchemyError

from fleetlora.coordinator.storage import LedgerStore
from fleetlora.coordinator.storage.ledgers import COMPLETED, FAILED

LOG = logging.getLogger("fleetlora.coordinator.rounds")
ADVANCE_SECONDS = 0.5  # counts written at most this often (each is a transaction); the last always


class RoundProgress:
    """Records one round's phases for one lineage (and Flower run, when deployed)."""

    def __init__(self, ledgers: LedgerStore, lineage: str, round_number: int, run_id: int | None) -> None:
        self.ledgers = ledgers
        self.lineage = lineage
        self.round = round_number
        self.run_id = run_id
        self.phase = ""
        self.total: int | None = None
        self._phase_id: int | None = None
        self._written_at = 0.0
        self._unwritten: int | None = None  # a count held back by the throttle, written before moving on

    def enter(self, phase: str, total: int | None = None, detail: str | None = None) -> None:
        """Begin ``phase`` (of ``total`` devices, when it counts them)."""
        if self._unwritten is not None:
            self._write(self._unwritten)
        self.phase, self.total = phase, total
        self._log(0, detail)
        try:
            info = self.ledgers.enter_phase(
                self.lineage, self.round, phase, run_id=self.run_id, total=total, detail=detail
            )
            self._phase_id = info.id
        except SQLAlchemyError as exc:
            self._phase_id = None
            LOG.warning("round %d: phase %s not recorded: %s", self.round, phase, exc)

    def advance(self, done: int) -> None:
        """``done`` of the phase's devices have answered (or been brought up to date)."""
        last = self.total is not None and done >= self.total
        if not last and time.monotonic() - self._written_at < ADVANCE_SECONDS:
            self._unwritten = done
            return
        self._write(done)

    def _write(self, done: int) -> None:
        self._written_at, self._unwritten = time.monotonic(), None
        if self._phase_id is None:
            return
        self._log(done)
        try:
            self.ledgers.advance_phase(self._phase_id, done)
        except SQLAlchemyError as exc:
            LOG.warning("round %d: progress of %s not recorded: %s", self.round, self.phase, exc)

    def completed(self, version_label: str) -> None:
        self.enter(COMPLETED, detail=version_label)

    def failed(self, error: str) -> None:
        self.enter(FAILED, detail=error)

    def _log(self, done: int, detail: str | None = None) -> None:
        counted = f" {done}/{self.total}" if self.total is not None else ""
        LOG.info(
            "round %d %s%s%s",
            self.round,
            self.phase,
            counted,
            f": {detail}" if detail else "",
            extra={
                "event": "round_phase",
                "lineage": self.lineage,
                "round": self.round,
                "run_id": self.run_id,
                "phase": self.phase,
                "done": done,
                "total": self.total,
                **({"version": detail} if self.phase == COMPLETED else {}),
                **({"error": detail} if self.phase == FAILED else {}),
            },
        )
