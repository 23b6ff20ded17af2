"""A device's gates (client/gates.py) driven by injected readings: each gate, hysteresis, sensor files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from fleetlora.client.device_state import DeviceState
from fleetlora.client.gates import FileSensors, Gates, NoSensors, Readings, last_decision, sensors_for
from fleetlora.common.device_settings import DeviceSettings
from fleetlora.common.errors import ConfigError
from fleetlora.common.host_config import load_host_config


class Script:
    """Readings in order, one per look (the last one repeats)."""

    def __init__(self, readings: Iterable[Readings]) -> None:
        self.readings = list(readings)

    def read(self) -> Readings:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def looks(settings: DeviceSettings, readings: Iterable[Readings]) -> list[bool]:
    """Whether the device may train after each reading."""
    readings = list(readings)
    gates = Gates(settings, Script(readings))
    return [gates.look().open for _ in readings]


DEFAULT = DeviceSettings()


def test_a_quiet_device_on_mains_may_train():
    verdict = Gates(DEFAULT, Script([Readings(foreground_load=0.1, on_battery=False, metered=False)])).look()
    assert verdict.open and verdict.reason == ""


def test_without_sensors_every_gate_is_open():
    assert Gates(DEFAULT, NoSensors()).look().open


def test_the_foreground_gate_closes_above_its_threshold_and_says_why():
    verdict = Gates(DEFAULT, Script([Readings(foreground_load=0.8)])).look()
    assert not verdict.open
    assert verdict.reason == "foreground load 0.80 (pauses above 0.50)"


def test_a_value_flapping_around_the_threshold_does_not_flap_the_decision():
    flapping = [Readings(foreground_load=v) for v in (0.45, 0.55, 0.45, 0.52, 0.40, 0.34)]
    # Open until it first passes 0.5; closed while it stays above 0.35; open once it is back under.
    assert looks(DEFAULT, flapping) == [True, False, False, False, False, True]


@pytest.mark.parametrize(
    ("reading", "may_train"),
    [
        (Readings(on_battery=True, battery_percent=20), False),  # below the 30% floor
        (Readings(on_battery=True, battery_percent=60), True),
        (Readings(on_battery=False, battery_percent=5), True),  # charging: the floor does not apply
        (Readings(on_battery=None, battery_percent=None), True),  # no battery at all
    ],
)
def test_the_battery_gate(reading: Readings, may_train: bool):
    assert Gates(DEFAULT, Script([reading])).look().open is may_train


def test_a_low_battery_reopens_only_once_charged_past_the_margin():
    charge = [Readings(on_battery=True, battery_percent=p) for p in (31, 29, 31, 34, 35)]
    assert looks(DEFAULT, charge) == [True, False, False, False, True]


def test_the_temperature_gate_counts_the_rise_since_training_began():
    heat = [Readings(temperature_c=t) for t in (50.0, 55.0, 58.5, 56.0, 54.9)]
    # Baseline 50: closes above +8, stays closed until back to +5 or less.
    assert looks(DEFAULT, heat) == [True, True, False, False, True]


def test_a_metered_network_closes_the_gate_unless_allowed():
    metered = Readings(metered=True)
    assert not Gates(DEFAULT, Script([metered])).look().open
    assert Gates(DeviceSettings(allow_metered=True), Script([metered])).look().open


def test_several_closed_gates_give_every_reason():
    verdict = Gates(DEFAULT, Script([Readings(foreground_load=0.9, metered=True)])).look()
    assert set(verdict.closed) == {"foreground", "network"}
    assert "foreground load" in verdict.reason and "metered network" in verdict.reason


def test_thresholds_come_from_the_settings():
    loose = DeviceSettings(max_foreground_load=0.95)
    assert Gates(loose, Script([Readings(foreground_load=0.9)])).look().open


def write_readings(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_a_sensor_file_drives_the_gates_and_is_reread_at_every_look(tmp_path: Path):
    path = write_readings(tmp_path / "sensors.json", {"foreground_load": 0.9})
    gates = Gates(DEFAULT, sensors_for(DeviceSettings(sensors=f"file:{path}")))
    assert not gates.look().open
    write_readings(path, {"foreground_load": 0.1, "on_battery": False})
    assert gates.look().open


@pytest.mark.parametrize(
    ("document", "why"),
    [
        ("not json", "Expecting value"),
        ([1, 2], "not a JSON object"),
        ({"foreground_load": "high"}, "must be a number"),
        ({"foreground_load": 3.0}, "between 0 and 1"),
        ({"on_battery": 1}, "true, false or null"),
        ({"cpu": 0.1}, "unknown reading"),
    ],
)
def test_a_bad_sensor_file_closes_every_gate_with_the_reason(tmp_path: Path, document: object, why: str):
    path = tmp_path / "sensors.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    verdict = Gates(DEFAULT, FileSensors(path)).look()
    assert not verdict.open and verdict.readings is None
    assert verdict.reason.startswith("sensors unreadable") and why in verdict.reason


def test_an_oversized_or_missing_sensor_file_is_refused_before_it_is_read(tmp_path: Path):
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (64 * 1024 + 1))
    assert "a sensor file is at most" in Gates(DEFAULT, FileSensors(huge)).look().reason
    assert not Gates(DEFAULT, FileSensors(tmp_path / "absent.json")).look().open


def test_the_decision_carries_to_the_next_round_through_the_state_folder(tmp_path: Path):
    device = DeviceState(tmp_path / "state")
    gates = Gates.load(DEFAULT, Script([Readings(foreground_load=0.7)]), device)
    gates.save(device, gates.look(), event="round check")
    # Next round: 0.45 would open a fresh gate, but this one closed and 0.45 is inside the margin.
    again = Gates.load(DEFAULT, Script([Readings(foreground_load=0.45)]), device)
    assert not again.look().open
    kept = last_decision(device)
    assert kept is not None and kept["event"] == "round check" and "foreground" in kept["closed"]
    assert kept["readings"]["foreground_load"] == 0.7


def test_a_damaged_gates_file_is_decided_afresh(tmp_path: Path):
    device = DeviceState(tmp_path)
    (tmp_path / "gates.json").write_text("{not json")
    tmp_path.chmod(0o700)
    assert Gates.load(DEFAULT, Script([Readings(foreground_load=0.45)]), device).look().open
    assert last_decision(device) is None


def test_the_temperature_baseline_is_kept_only_while_its_gate_is_closed(tmp_path: Path):
    device = DeviceState(tmp_path / "state")
    hot = Gates.load(DEFAULT, Script([Readings(temperature_c=40.0), Readings(temperature_c=49.0)]), device)
    hot.look()
    hot.save(device, hot.look(), event="round given up")
    # Still 47 °C next round: +7 over the stored 40 °C is not cool enough to reopen (needs +5).
    assert not Gates.load(DEFAULT, Script([Readings(temperature_c=47.0)]), device).look().open
    # Once reopened, a new round starts counting from its own first reading.
    cooled = Gates.load(DEFAULT, Script([Readings(temperature_c=44.0)]), device)
    verdict = cooled.look()
    cooled.save(device, verdict, event="round check")
    assert verdict.open and Gates.load(DEFAULT, NoSensors(), device).baseline_c is None


# ---- the settings that carry the thresholds


def test_node_config_settings_are_typed_and_checked():
    settings = DeviceSettings.from_node_config({"max-foreground-load": 1, "nice": 19, "accelerator": "cpu"})
    assert (settings.max_foreground_load, settings.nice, settings.accelerator) == (1.0, 19, "cpu")
    for bad, why in [
        ({"nice": 25}, "nice must be between 0 and 19"),
        ({"nice": "10"}, "nice must be int"),
        ({"accelerator": "tpu"}, "accelerator must be one of"),
        ({"max-foreground-load": float("nan")}, "finite"),
        ({"sensors": "http://x"}, "sensors must be psutil, none or file:PATH"),
    ]:
        with pytest.raises(ConfigError, match=why):
            DeviceSettings.from_node_config(bad)


def test_a_simulated_device_reads_no_sensors_unless_told_to():
    assert DeviceSettings.from_node_config({"partition-id": 3}).sensors == "none"
    assert DeviceSettings.from_node_config({"partition-id": 3, "sensors": "psutil"}).sensors == "psutil"
    assert DeviceSettings.from_node_config({"device-id": "kiosk-7"}).sensors == "psutil"


def test_the_device_section_of_fleetlora_toml_carries_the_settings_to_the_node_config(tmp_path: Path):
    config = tmp_path / "fleetlora.toml"
    config.write_text('[device]\ndevice-id = "kiosk-7"\nmax-foreground-load = 0.8\nnice = 15\n')
    device = load_host_config(config).device
    assert device.device_id == "kiosk-7"
    assert device.settings.to_node_config() == {"max-foreground-load": 0.8, "nice": 15}
    assert DeviceSettings.from_node_config(device.settings.to_node_config()) == device.settings
    config.write_text("[device]\nnice = 99\n")
    with pytest.raises(ConfigError, match=r"\[device\]: nice must be between 0 and 19"):
        load_host_config(config)


def test_a_sensor_file_in_fleetlora_toml_is_relative_to_the_config(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "fleetlora.toml"
    config.write_text('[device]\nsensors = "file:sensors.json"\n')
    assert load_host_config(config).device.settings.sensors == f"file:{tmp_path / 'etc' / 'sensors.json'}"
    config.write_text(f'[device]\nsensors = "file:{tmp_path / "abs.json"}"\n')
    assert load_host_config(config).device.settings.sensors == f"file:{tmp_path / 'abs.json'}"


@pytest.mark.parametrize(
    ("settings", "readings"),
    [
        # Each limit is below its usual reopen margin: the margin shrinks to half the limit, so it reopens.
        (DeviceSettings(max_foreground_load=0.1), [Readings(foreground_load=v) for v in (0.3, 0.0)]),
        (DeviceSettings(max_temperature_rise=2.0), [Readings(temperature_c=v) for v in (50, 53, 50)]),
        (
            DeviceSettings(min_battery_percent=98.0),
            [Readings(on_battery=True, battery_percent=v) for v in (90, 100)],
        ),
    ],
)
def test_a_gate_set_tighter_than_its_margin_still_reopens(settings: DeviceSettings, readings: list[Readings]):
    assert looks(settings, readings)[-2:] == [False, True]


def test_an_unreadable_sensor_closes_every_gate_and_forgets_nothing(tmp_path: Path):
    sensors = tmp_path / "sensors.json"
    gates = Gates(DEFAULT, FileSensors(sensors))
    sensors.write_text(json.dumps({"temperature_c": 40.0}))
    gates.look()  # the baseline: 40 °C
    sensors.write_text(json.dumps({"temperature_c": 49.0, "foreground_load": 0.6}))
    assert set(gates.look().closed) == {"temperature", "foreground"}
    sensors.write_text('{"temperature_c": ')  # torn mid-write
    assert set(gates.look().closed) == {"temperature", "foreground", "sensors"}
    device = DeviceState(tmp_path / "state")
    gates.save(device, gates.look(), event="round check")
    # Still hot and busy, inside the limits but not back past the margins: both stay closed.
    sensors.write_text(json.dumps({"temperature_c": 47.0, "foreground_load": 0.45}))
    reloaded = Gates.load(DEFAULT, FileSensors(sensors), device)
    assert reloaded.baseline_c == 40.0
    assert set(reloaded.look().closed) == {"temperature", "foreground"}


@pytest.mark.parametrize(
    "text",
    ["[" * 60_000, '{"temperature_c": ' + "1" * 5000 + "}", b"\xff\xfe".decode("latin-1")],
    ids=["nested too deep", "number too long", "not UTF-8"],
)
def test_a_sensor_file_that_breaks_the_parser_closes_the_gates(tmp_path: Path, text: str):
    sensors = tmp_path / "sensors.json"
    sensors.write_bytes(text.encode("latin-1"))
    verdict = Gates(DEFAULT, FileSensors(sensors)).look()
    assert set(verdict.closed) == {"sensors"} and len(verdict.reason) <= 600


@pytest.mark.parametrize(
    "kept",
    [
        "[" * 60_000,
        '{"closed": {"foreground": "x"}, "baseline_c": ' + "9" * 5000 + "}",
        '{"closed": {"bogus": "' + "x" * 50_000 + '"}}',
        '{"closed": {"temperature": "hot"}, "baseline_c": NaN}',
    ],
    ids=["nested too deep", "number too long", "unknown gate", "NaN baseline"],
)
def test_a_hostile_gates_file_never_keeps_a_gate_closed_it_cannot_reopen(tmp_path: Path, kept: str):
    device = DeviceState(tmp_path / "state")
    device.save_json("gates", {})
    device.path("gates", ".json").write_text(kept)
    gates = Gates.load(DEFAULT, Script([Readings(foreground_load=0.0, temperature_c=40.0)]), device)
    assert set(gates.closed) <= {"foreground", "temperature"} and gates.baseline_c is None
    assert all(len(reason) <= 500 for reason in gates.closed.values())
    assert gates.look().open
