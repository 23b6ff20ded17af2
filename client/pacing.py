"""How a round's steps share the device: low priority, pauses for the foreground, and a deadline.

Training runs at a raised niceness and a capped number of torch threads (:func:`low_priority`), so the
scheduler gives the foreground what it asks for first. Between steps a :class:`Pacer` looks at the
device's gates (:mod:`fleetlora.client.gates`): while one is closed the round waits where it stopped,
and carries on from the same step once they reopen. The batches are drawn before the first step, so a
paused round trains exactly what an uninterrupted one would.

A round that cannot finish before its deadline (the train message's time to live, after which the
SuperLink would drop the reply anyway) is given up with :class:`RoundAbandoned`: nothing is uploaded or
kept (the caller discards the half-trained weights), and under DP only the steps taken are charged.

On battery, training's CPU share is held to ``battery-power-share`` by sleeping after a step for as
long as needed: CPU time is the power a CPU-bound step draws, the share of it the measurable proxy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

import torch

from fleetlora.client.gates import Gates, Verdict
from fleetlora.common.device_settings import DeviceSettings

log = logging.getLogger(__name__)

LOOK_INTERVAL = 0.25  # seconds: the gates are looked at before a step at most this often
PAUSED_POLL = 1.0  # seconds between looks while paused
UPLOAD_MARGIN = 0.1  # share of the time left kept for sealing and sending the reply


class RoundAbandoned(Exception):
    """The round was given up before its last step: ``steps_taken`` steps ran (and are charged under DP)."""

    def __init__(self, steps_taken: int, reason: str) -> None:
        super().__init__(reason)
        self.steps_taken = steps_taken


class Pacer:
    """The pause point a :class:`~fleetlora.client.train.Runtime` calls before every step.

    ``deadline`` is a ``time.time()`` instant (None: no deadline); ``steps`` the round's step count, from
    which the time still needed is estimated. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        gates: Gates,
        *,
        steps: int,
        deadline: float | None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.gates, self.steps, self.deadline = gates, steps, deadline
        self.clock, self.sleep = clock, sleep
        self.paused_seconds = 0.0  # waiting for gates and resting on battery
        self.throttled_seconds = 0.0  # the battery rests alone
        self.paused_at: list[int] = []  # the step each pause came before
        self._started = clock()
        self._last_look = -float("inf")
        self._last_step = self._started
        self.verdict: Verdict | None = None

    def __call__(self, taken: int) -> None:
        now = self.clock()
        self._throttle(now)
        if now - self._last_look >= LOOK_INTERVAL or taken == 0:
            self._look()
            if not self.verdict or not self.verdict.open:
                self._wait(taken)
        self._check_deadline(taken)
        self._last_step = self.clock()

    @property
    def pauses(self) -> int:
        return len(self.paused_at)

    def _look(self) -> None:
        self.verdict = self.gates.look()
        self._last_look = self.clock()

    def _wait(self, taken: int) -> None:
        """Wait until every gate is open again, or give the round up when the deadline comes."""
        assert self.verdict is not None
        paused_at = self.clock()
        self.paused_at.append(taken)
        log.info("Paused before step %d: %s", taken, self.verdict.reason, extra={"event": "training_paused"})
        while not self.verdict.open:
            if self.deadline is not None and self.clock() >= self.deadline:
                raise RoundAbandoned(taken, f"paused past the round's deadline ({self.verdict.reason})")
            self.sleep(PAUSED_POLL)
            self._look()
        waited = self.clock() - paused_at
        self.paused_seconds += waited
        log.info("Resumed at step %d after %.1f s", taken, waited, extra={"event": "training_resumed"})

    def _check_deadline(self, taken: int) -> None:
        """Give up now rather than train steps whose result would arrive after the deadline."""
        if self.deadline is None:
            return
        now = self.clock()
        if taken == 0:  # no step to estimate from yet; one past the deadline would be charged for nothing
            if now >= self.deadline:
                raise RoundAbandoned(0, "the round's deadline passed before its first step")
            return
        # A step's time includes the rests the battery throttle adds after it; pauses for gates do not.
        per_step = (now - self._started - self.paused_seconds + self.throttled_seconds) / taken
        needed = per_step * (self.steps - taken)
        left = (self.deadline - now) * (1 - UPLOAD_MARGIN)
        if needed > left:
            raise RoundAbandoned(
                taken,
                f"cannot finish before the round's deadline: {self.steps - taken} steps left at "
                f"{per_step:.2f} s each, {max(0.0, left):.1f} s left",
            )

    def _throttle(self, now: float) -> None:
        """On battery, sleep after a step long enough to keep training's CPU share at the power share."""
        readings = self.verdict.readings if self.verdict else None
        if not readings or not readings.on_battery or readings.own_load is None:
            return
        share = self.gates.settings.battery_power_share
        if readings.own_load > share:
            step = now - self._last_step
            rest = step * (readings.own_load / share - 1)
            self.sleep(rest)
            self.paused_seconds += rest
            self.throttled_seconds += rest


def _niceness(thread: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, thread)
    except ProcessLookupError:
        return None


def _threads() -> list[int]:
    """This process's threads where they are separately niced (Linux), else the process itself (0)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


@contextlib.contextmanager
def low_priority(settings: DeviceSettings) -> Iterator[int]:
    """Train at ``settings.nice`` and a capped thread count; yields the thread count.

    On Linux niceness belongs to each thread, and a thread inherits its creator's: every thread already
    running (torch's and the tokenizers' pools) is lowered too, or they would go on competing with the
    foreground at normal priority. After the block each thread gets its niceness back where the OS lets
    it (raising priority again needs privilege): the warm ClientApp forks a process per message, so a
    deployed round's process ends anyway, but an in-process caller (a test, an embedding app) and every
    process it starts later would otherwise stay at low priority. The thread cap is restored too.
    """
    before = {thread: _niceness(thread) for thread in _threads()}
    for thread, nice in before.items():
        if nice is not None and settings.nice > nice:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.setpriority(os.PRIO_PROCESS, thread, settings.nice)
    threads = settings.train_threads or max(1, (os.cpu_count() or 1) // 2)
    cap = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(cap)
        for thread, nice in before.items():
            if nice is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):  # unprivileged: it stays
                    os.setpriority(os.PRIO_PROCESS, thread, nice)
