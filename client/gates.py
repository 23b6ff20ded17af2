"""When a device may train: its gates, read from real sensors or from injected ones.

A production fleet trains only on a device that can afford it (Bonawitz et al., "Towards Federated
Learning at Scale", MLSys 2019: idle, charging, unmetered). Each gate here turns one sensor reading into
open or closed, checked before a round (a closed gate declines it, with the reason) and between its steps
(a closed gate pauses it, :mod:`fleetlora.client.pacing`):

- **foreground**: the CPU share other processes use (the machine's busy share less training's own);
  closes above ``max-foreground-load``.
- **battery**: on battery below ``min-battery-percent``; charging, or a machine without a battery,
  keeps it open. (On battery, training's CPU share is also held to ``battery-power-share`` by pacing.)
- **temperature**: the hottest sensor's rise since training began; closes above
  ``max-temperature-rise`` °C.
- **network**: a metered network closes it unless ``allow-metered``: the round's upload would be paid for.

Consent is not a sensor: a device without upload consent refuses every message (client_app.py).

**Hysteresis.** A closed gate reopens only once its value is back past a margin inside the threshold
(:data:`REOPEN_MARGIN`), so a value flapping around the threshold does not flap the decision. Which gates
are closed is kept in the device's state folder (``gates.json``), with the last readings, so the decision
carries from one round's check to the next and ``fleetlora device status`` can show it.

**Sensors** (``sensors`` in the node config): ``psutil`` reads the platform's (a missing sensor reads as
None and keeps its gate open); ``none`` reads nothing (a simulated device); ``file:PATH`` reads a small JSON
object of readings, re-read at every look, so a test or a simulation drives a real agent's gates by
rewriting it. A sensor file that cannot be read closes every gate: a device that cannot tell whether it
may train does not.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from fleetlora.client.device_state import DeviceState
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import IncompatibleStateError

GATES_FILE = "gates"  # gates.json in the state folder
MAX_SENSOR_FILE_BYTES = 64 * 1024
MAX_GATES_FILE_BYTES = 64 * 1024
# How far back inside its threshold a value must come before a closed gate reopens.
REOPEN_MARGIN = {"foreground": 0.15, "battery": 5.0, "temperature": 3.0}
GATES = frozenset({"foreground", "battery", "temperature", "network", "sensors"})  # what gates.json may close
MAX_REASON = 500  # characters of a gate's reason kept


@dataclass(frozen=True)
class Readings:
    """One look at the sensors; None where the platform has no such sensor."""

    foreground_load: float | None = None  # CPU share [0, 1] of the machine used by other processes
    own_load: float | None = None  # CPU share [0, 1] of the machine used by this (training) process
    on_battery: bool | None = None
    battery_percent: float | None = None
    temperature_c: float | None = None  # the hottest sensor
    metered: bool | None = None


class Sensors(Protocol):
    """A source of readings: the real sensors, none, or injected ones."""

    def read(self) -> Readings: ...


class NoSensors:
    """Reads nothing: every gate stays open (a simulated device, whose "foreground" is its fleet)."""

    def read(self) -> Readings:
        return Readings()


class FileSensors:
    """Readings from a JSON file (the :class:`Readings` fields), re-read at every look.

    Hostile input: at most 64 KiB, a JSON object, each known key of its field's type; an unknown key or
    a bad value is refused with the reason, which closes every gate.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Readings:
        try:
            size = self.path.stat().st_size
            if size > MAX_SENSOR_FILE_BYTES:
                raise SensorError(f"{size} bytes; a sensor file is at most {MAX_SENSOR_FILE_BYTES}")
            document = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, JSON or numbers
            raise SensorError(str(exc)[:MAX_REASON]) from exc
        return readings_from(document)


def readings_from(document: Any) -> Readings:
    """A :class:`Readings` from a JSON object, every value checked (raises :class:`SensorError`)."""
    if not isinstance(document, dict):
        raise SensorError("not a JSON object")
    kinds = {f.name: f for f in fields(Readings)}
    unknown = set(document) - set(kinds)
    if unknown:
        raise SensorError(f"unknown reading(s) {sorted(unknown)}; known: {sorted(kinds)}")
    values: dict[str, Any] = {}
    for key, value in document.items():
        if value is None:
            continue
        if key in ("on_battery", "metered"):
            if type(value) is not bool:
                raise SensorError(f"{key} must be true, false or null, got {value!r}")
        elif type(value) not in (int, float) or not -1e6 < value < 1e6:
            raise SensorError(f"{key} must be a number, got {value!r}")
        values[key] = value
    for key in ("foreground_load", "own_load"):
        if key in values and not 0.0 <= values[key] <= 1.0:
            raise SensorError(f"{key} must be between 0 and 1, got {values[key]!r}")
    return Readings(**values)


class PsutilSensors:
    """The platform's sensors through psutil; CPU shares are measured since the previous read."""

    MIN_WINDOW = 0.2  # seconds: a CPU share over a shorter window is noise

    def __init__(self) -> None:
        import psutil  # the real sensors only: simulated devices never import it

        self._psutil = psutil
        self._process = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        psutil.cpu_percent(interval=None)  # start both windows now
        self._process.cpu_percent(interval=None)
        self._since = time.monotonic()

    def read(self) -> Readings:
        wait = self.MIN_WINDOW - (time.monotonic() - self._since)
        if wait > 0:
            time.sleep(wait)
        busy = self._psutil.cpu_percent(interval=None) / 100
        own = min(1.0, self._process.cpu_percent(interval=None) / 100 / self._cores)
        self._since = time.monotonic()
        battery = self._battery()
        return Readings(
            foreground_load=max(0.0, busy - own),
            own_load=own,
            on_battery=None if battery is None else not battery.power_plugged,
            battery_percent=None if battery is None else float(battery.percent),
            temperature_c=self._hottest(),
            metered=network_metered(),
        )

    def _battery(self) -> Any:
        reader = getattr(self._psutil, "sensors_battery", None)  # absent on some platforms
        return reader() if reader else None

    def _hottest(self) -> float | None:
        reader = getattr(self._psutil, "sensors_temperatures", None)
        sensors = reader() if reader else {}
        values = [
            t.current
            for entries in sensors.values()
            for t in entries
            if t.current and math.isfinite(t.current)
        ]
        return max(values) if values else None


def network_metered() -> bool | None:
    """Whether NetworkManager marks the connection in use as metered; None where it cannot tell."""
    nmcli = shutil.which("nmcli")
    if nmcli is None:
        return None
    try:
        shown = subprocess.run(
            [nmcli, "-t", "-f", "GENERAL.METERED", "device", "show"],
            capture_output=True,
            text=True,
            timeout=2,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    answers = [line.split(":", 1)[1] for line in shown.splitlines() if ":" in line]
    if any(a.startswith("yes") for a in answers):  # "yes" or "yes (guessed)"
        return True
    return False if any(a.startswith("no") for a in answers) else None


def sensors_for(settings: DeviceSettings) -> Sensors:
    """The sensor source ``settings.sensors`` names."""
    if settings.sensors == "none":
        return NoSensors()
    if settings.sensors.startswith("file:"):
        return FileSensors(Path(settings.sensors.removeprefix("file:")))
    return PsutilSensors()


class SensorError(Exception):
    """The sensors could not be read: every gate closes."""


@dataclass(frozen=True)
class Verdict:
    """The gates after one look: closed ones with their reasons (none closed: the device may train)."""

    closed: Mapping[str, str]
    readings: Readings | None  # None when the sensors could not be read

    @property
    def open(self) -> bool:
        return not self.closed

    @property
    def reason(self) -> str:
        """The closed gates' reasons, one line (empty when open)."""
        return "; ".join(self.closed.values())


class Gates:
    """The gates of one device: a look at its sensors against its settings, with hysteresis.

    ``closed`` is the gates closed at the previous look (from ``gates.json``, or a fresh {}), and
    ``baseline_c`` the temperature when training began (None: take the first reading as it).
    """

    def __init__(
        self,
        settings: DeviceSettings,
        sensors: Sensors,
        *,
        closed: Mapping[str, str] | None = None,
        baseline_c: float | None = None,
    ) -> None:
        self.settings = settings
        self.sensors = sensors
        self.closed: dict[str, str] = dict(closed or {})
        self.baseline_c = baseline_c

    def look(self) -> Verdict:
        """Read the sensors once and decide every gate."""
        try:
            readings = self.sensors.read()
        except SensorError as exc:  # every gate closes; what the others decided stays for the next look
            self.closed["sensors"] = f"sensors unreadable ({exc})"[:MAX_REASON]
            return Verdict(dict(self.closed), None)
        self.closed.pop("sensors", None)
        if self.baseline_c is None and readings.temperature_c is not None:
            self.baseline_c = readings.temperature_c
        self._decide("foreground", *self._foreground(readings))
        self._decide("battery", *self._battery(readings))
        self._decide("temperature", *self._temperature(readings))
        self._decide("network", *self._network(readings))
        return Verdict(dict(self.closed), readings)

    def _decide(self, gate: str, closes: bool, reopens: bool, reason: str) -> None:
        """Close on ``closes``; a closed gate reopens only on ``reopens`` (inside the margin)."""
        if closes:
            self.closed[gate] = reason
        elif gate in self.closed and reopens:
            del self.closed[gate]
        elif gate in self.closed:
            self.closed[gate] = reason  # still closed: the reason with today's value

    def _foreground(self, r: Readings) -> tuple[bool, bool, str]:
        limit = self.settings.max_foreground_load
        if r.foreground_load is None:
            return False, True, ""
        reason = f"foreground load {r.foreground_load:.2f} (pauses above {limit:.2f})"
        margin = min(REOPEN_MARGIN["foreground"], limit / 2)  # a low limit must still be reachable
        return r.foreground_load > limit, r.foreground_load <= limit - margin, reason

    def _battery(self, r: Readings) -> tuple[bool, bool, str]:
        floor = self.settings.min_battery_percent
        if not r.on_battery or r.battery_percent is None:  # mains, charging, or no battery at all
            return False, True, ""
        reason = f"on battery at {r.battery_percent:.0f}% (trains on battery above {floor:.0f}%)"
        margin = min(REOPEN_MARGIN["battery"], (100 - floor) / 2)  # a full battery must still reopen it
        return r.battery_percent < floor, r.battery_percent >= floor + margin, reason

    def _temperature(self, r: Readings) -> tuple[bool, bool, str]:
        if r.temperature_c is None or self.baseline_c is None:
            return False, True, ""
        limit = self.settings.max_temperature_rise
        rise = r.temperature_c - self.baseline_c
        reason = f"{r.temperature_c:.1f} °C, {rise:+.1f} °C since training began (limit +{limit:g})"
        margin = min(REOPEN_MARGIN["temperature"], limit / 2)  # cooling to the baseline must reopen it
        return rise > limit, rise <= limit - margin, reason

    def _network(self, r: Readings) -> tuple[bool, bool, str]:
        metered = bool(r.metered) and not self.settings.allow_metered
        return metered, not metered, "metered network (allow-metered is off: no upload)"

    # ---- kept between rounds, in the state folder

    @classmethod
    def load(cls, settings: DeviceSettings, sensors: Sensors, device: DeviceState | None) -> Gates:
        """The device's gates with the decision its last look left (a damaged file counts as none).

        The stored temperature baseline is kept only while the temperature (or sensors) gate is closed:
        otherwise each round's own training starts the count again. Hostile input: only the known gates
        are taken, each reason cut to ``MAX_REASON``; a gate the device never decides could never reopen.
        """
        kept = _load_kept(device)
        closed = kept.get("closed", {})
        if not isinstance(closed, dict) or not all(isinstance(v, str) for v in closed.values()):
            closed = {}
        closed = {gate: reason[:MAX_REASON] for gate, reason in closed.items() if gate in GATES}
        baseline = finite_number(kept.get("baseline_c"))
        keep = not closed.keys().isdisjoint({"temperature", "sensors"}) and baseline is not None
        return cls(settings, sensors, closed=closed, baseline_c=baseline if keep else None)

    def save(self, device: DeviceState | None, verdict: Verdict, *, event: str) -> None:
        """Record the decision and the readings it came from (``device status`` shows them)."""
        if device is None:
            return
        device.save_json(
            GATES_FILE,
            {
                "at": time.time(),
                "event": event,
                "closed": dict(self.closed),
                "baseline_c": self.baseline_c,
                "readings": asdict(verdict.readings) if verdict.readings else None,
            },
        )


def _load_kept(device: DeviceState | None) -> dict[str, Any]:
    if device is None:
        return {}
    try:
        return device.load_json(GATES_FILE, max_bytes=MAX_GATES_FILE_BYTES) or {}
    except IncompatibleStateError:
        return {}  # the decision is re-made from the sensors; nothing else depends on the file


def finite_number(value: Any) -> float | None:
    """``value`` from a JSON document if it is a finite number (not a bool, NaN or infinity), else None."""
    if type(value) not in (int, float) or not math.isfinite(value):
        return None
    return float(value)


def last_decision(device: DeviceState) -> dict[str, Any] | None:
    """What ``gates.json`` says about the last look (None: none recorded, or damaged)."""
    return _load_kept(device) or None
