"""How a device may train: where (accelerator), in how much memory, at what priority, and when (its gates).

One dataclass serves both ends of the trip: ``fleetlora.toml``'s ``[device]`` section sets it
(:mod:`fleetlora.common.host_config`), ``device up`` passes every setting that differs from its default in
the SuperNode's node config, and the ClientApp reads it back with :meth:`DeviceSettings.from_node_config`.
A node config is the device owner's, but it is still a file on disk and a string on a command line: every
value is checked for its type and range, and a bad one is a :class:`ConfigError` that names the setting.

A simulated device (its node config holds ``partition-id``) reads no real sensors unless told to: on a
researcher's machine the other virtual devices are the "foreground load", which would close every gate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetlora.common.errors import ConfigError

ACCELERATORS = ("auto", "cpu", "cuda", "mps", "xpu")
SWITCHES = ("auto", "on", "off")


@dataclass(frozen=True)
class DeviceSettings:
    """A device's resource settings and gate thresholds (docs/device.md, "Gates")."""

    accelerator: str = "auto"  # auto: CUDA, then Apple MPS, then Intel XPU, then the CPU
    mixed_precision: str = "auto"  # auto: bf16 autocast where the accelerator supports it (never on CPU)
    memory_budget_mb: int = 0  # the memory training may use; 0: half the machine's (or the accelerator's)
    gradient_checkpointing: str = "auto"  # auto: on when the estimated peak would not fit the budget
    nice: int = 10  # the training process's niceness, 0 (normal) to 19 (lowest)
    train_threads: int = 0  # torch threads while training; 0: half the cores, at least one
    # Gates: a closed one declines the round before it starts, or pauses it between steps.
    max_foreground_load: float = 0.5  # CPU share other processes may use before training pauses
    min_battery_percent: float = 30.0  # on battery, no training below this charge
    battery_power_share: float = 0.25  # on battery, training's most CPU share (the power budget's proxy)
    max_temperature_rise: float = 8.0  # °C above the temperature when training began
    allow_metered: bool = False  # upload over a metered network
    sensors: str = "psutil"  # psutil (the real ones), none (every gate open) or file:PATH (injected readings)

    def __post_init__(self) -> None:
        _one_of("accelerator", self.accelerator, ACCELERATORS)
        _one_of("mixed-precision", self.mixed_precision, SWITCHES)
        _one_of("gradient-checkpointing", self.gradient_checkpointing, SWITCHES)
        _within("memory-budget-mb", self.memory_budget_mb, 0, 2**30)
        _within("nice", self.nice, 0, 19)
        _within("train-threads", self.train_threads, 0, 1024)
        _within("max-foreground-load", self.max_foreground_load, 0.05, 1.0)
        _within("min-battery-percent", self.min_battery_percent, 0.0, 100.0)
        _within("battery-power-share", self.battery_power_share, 0.05, 1.0)
        _within("max-temperature-rise", self.max_temperature_rise, 0.5, 50.0)
        if self.sensors not in ("psutil", "none") and not self.sensors.startswith("file:"):
            raise ConfigError(f"sensors must be psutil, none or file:PATH, got {self.sensors!r}.")
        if self.sensors == "file:":
            raise ConfigError("sensors = file:PATH needs a path after 'file:'.")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DeviceSettings:
        """The settings a SuperNode's node config names; the rest at their defaults.

        A simulated device (``partition-id``, no ``sensors``) reads no sensors: see the module docstring.
        """
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            key = spec.name.replace("_", "-")
            if key in node_config:
                values[spec.name] = _typed(key, node_config[key], type(spec.default))
        if "partition-id" in node_config and "sensors" not in node_config:
            values["sensors"] = "none"
        return cls(**values)

    def to_node_config(self) -> dict[str, str | bool | int | float]:
        """The settings that differ from the defaults, as node-config entries (``device up``)."""
        default = DeviceSettings()
        return {
            spec.name.replace("_", "-"): getattr(self, spec.name)
            for spec in dataclasses.fields(self)
            if getattr(self, spec.name) != getattr(default, spec.name)
        }


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``; Flower's node config parser gives TOML types, so only int → float widens."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"Node config {key} must be {kind.__name__}, got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Node config {key} must be a finite number, got {value!r}.")
    return value


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}.")


def _within(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}; got {value!r}.")
