"""``fleetlora device status`` shows the device's gates: as ``gates.json`` left them, or a live look.

The gates file is written by the real :meth:`Gates.save` from injected readings; a damaged one is hostile
input and shows nothing (never a traceback). ``--gates-now`` reads a sensor file named by ``--config``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleetlora.cli import app
from fleetlora.client.device_state import DeviceState
from fleetlora.client.gates import Gates, Readings
from fleetlora.common.device_settings import DeviceSettings

REPO = Path(__file__).resolve().parents[2]
NO_GATES_LINE = "no packaged adapter yet: the device runs the initial one until a package is applied\n"


class Fixed:
    """Sensors that always read the same."""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def read(self) -> Readings:
        return self.readings


def _saved(state: Path, readings: Readings, event: str) -> None:
    device = DeviceState(state)
    gates = Gates.load(DeviceSettings(), Fixed(readings), device)
    gates.save(device, gates.look(), event=event)


def _status(*args: str) -> str:
    result = CliRunner().invoke(app, ["device", "status", *args])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result.output


def test_closed_gates_show_the_reason_the_event_and_the_readings(tmp_path: Path):
    state = tmp_path / "state"
    readings = Readings(0.82, 0.4, on_battery=True, battery_percent=54.0, temperature_c=41.0, metered=False)
    _saved(state, readings, "round check")

    lines = _status("--state-dir", str(state)).splitlines()
    assert lines[0] == NO_GATES_LINE.strip()
    assert lines[1].startswith("gates: closed: foreground load 0.82 (pauses above 0.50) (round check, ")
    assert lines[1].endswith(" s ago)")
    assert lines[2] == "readings: foreground 0.82, own 0.40, on battery 54%, 41.0 °C, metered no"
    assert len(lines) == 3

    shown = json.loads(_status("--state-dir", str(state), "--json"))
    assert set(shown) == {"gates"}  # no adapter yet: an object with the gates alone
    gates = shown["gates"]
    assert gates["open"] is False and gates["live"] is False and gates["event"] == "round check"
    assert gates["closed"] == {"foreground": "foreground load 0.82 (pauses above 0.50)"}
    assert time.time() - 60 < gates["at"] <= time.time()
    assert gates["readings"]["foreground_load"] == 0.82 and gates["readings"]["metered"] is False


def test_open_gates_show_only_the_readings_there_are(tmp_path: Path):
    state = tmp_path / "state"
    _saved(state, Readings(foreground_load=0.12, metered=True), "round trained")
    assert "network" in json.loads((state / "gates.json").read_text())["closed"]  # metered closes it
    _saved(state, Readings(foreground_load=0.12, on_battery=False), "round trained")

    lines = _status("--state-dir", str(state)).splitlines()[1:]
    assert lines[0].startswith("gates: open (round trained, ") and lines[0].endswith(" ago)")
    assert lines[1] == "readings: foreground 0.12, on mains"
    gates = json.loads(_status("--state-dir", str(state), "--json"))["gates"]
    assert gates["open"] is True and gates["closed"] == {} and gates["readings"]["own_load"] is None


def test_without_a_gates_file_status_is_unchanged(tmp_path: Path):
    state = str(tmp_path / "state")
    assert _status("--state-dir", state) == NO_GATES_LINE
    assert json.loads(_status("--state-dir", state, "--json")) is None


def _kept(**changes: object) -> bytes:
    """A gates.json of the saved shape, with ``changes``."""
    return json.dumps({"at": 1.0, "event": "status", "closed": {}, "readings": None} | changes).encode()


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe garbage \x00",
        b"{not json",
        b"[1, 2]",
        _kept(closed=[1, 2]),
        _kept(closed={"foreground": 3}),
        _kept(at="soon"),
        _kept(at=True),
        _kept(event=["round"]),
        _kept(readings={"foreground_load": "hi"}),
        _kept(readings={"rogue": 1}),
        _kept(readings=[0.1]),
        b'{"at": Infinity, "event": "status", "closed": {}, "readings": null}',
        _kept(pad=" " * (64 * 1024)),
    ],
    ids=[
        "bytes", "not-json", "list", "closed-list", "closed-values", "at-text", "at-bool", "event-list",
        "reading-text", "reading-unknown", "readings-list", "at-infinite", "oversize",
    ],
)  # fmt: skip
def test_a_damaged_gates_file_shows_no_gates(tmp_path: Path, content: bytes):
    state = tmp_path / "state"
    _saved(state, Readings(foreground_load=0.9), "round check")  # the folder, made as the agent makes it
    (state / "gates.json").write_bytes(content)
    assert _status("--state-dir", str(state)) == NO_GATES_LINE
    assert json.loads(_status("--state-dir", str(state), "--json")) is None


def test_text_from_the_gates_file_cannot_drive_the_terminal(tmp_path: Path):
    state = tmp_path / "state"
    _saved(state, Readings(), "status")
    document = json.loads((state / "gates.json").read_text())
    document |= {"closed": {"foreground": "\x1b[2Jbusy\nforged: line"}, "event": "round\x07 check"}
    (state / "gates.json").write_text(json.dumps(document))
    lines = _status("--state-dir", str(state)).splitlines()
    assert lines[1].startswith("gates: closed: \\x1b[2Jbusy\\x0aforged: line (round\\x07 check, ")
    assert lines[2] == "readings: none" and len(lines) == 3


def test_gates_now_takes_a_live_look_with_the_configs_thresholds_and_saves_nothing(tmp_path: Path):
    sensor = tmp_path / "sensors.json"
    sensor.write_text(json.dumps({"foreground_load": 0.7, "metered": False}))
    config = tmp_path / "fleetlora.toml"
    config.write_text(f'[device]\nsensors = "file:{sensor}"\nmax-foreground-load = 0.6\n')
    state = tmp_path / "state"
    _saved(state, Readings(foreground_load=0.1), "round trained")
    before = (state / "gates.json").read_bytes()

    args = ["--state-dir", str(state), "--gates-now", "--config", str(config)]
    lines = _status(*args).splitlines()[1:]
    assert lines == [
        "gates: closed: foreground load 0.70 (pauses above 0.60) (now)",
        "readings: foreground 0.70, metered no",
    ]
    gates = json.loads(_status(*args, "--json"))["gates"]
    assert gates["live"] is True and gates["event"] is None and not gates["open"]
    assert set(gates["closed"]) == {"foreground"} and gates["readings"]["foreground_load"] == 0.7
    assert (state / "gates.json").read_bytes() == before  # a look from the command line is not recorded

    sensor.write_text("{broken")  # an unreadable sensor is the reason, not a traceback
    lines = _status(*args).splitlines()[1:]
    assert lines[0].startswith("gates: closed: sensors unreadable (") and lines[0].endswith("(now)")
    assert len(lines) == 1
    gates = json.loads(_status(*args, "--json"))["gates"]
    assert set(gates["closed"]) == {"sensors"} and gates["readings"] is None


def test_the_status_path_imports_no_torch(tmp_path: Path):
    state = tmp_path / "state"
    _saved(state, Readings(foreground_load=0.82), "round check")
    sensor = tmp_path / "sensors.json"
    sensor.write_text("{}")
    config = tmp_path / "fleetlora.toml"
    config.write_text(f'[device]\nsensors = "file:{sensor}"\n')
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fleetlora.cli import app\n"
        f"for extra in ([], ['--json'], ['--gates-now', '--config', {str(config)!r}]):\n"
        f"    done = CliRunner().invoke(app, ['device', 'status', '--state-dir', {str(state)!r}, *extra])\n"
        "    assert done.exit_code == 0 and 'gates' in done.output, done.output\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
