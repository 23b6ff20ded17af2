"""The least privacy a device accepts: its own setting, which a coordinator's request can only tighten.

The ``train.privacy.*`` settings arrive with every message from the coordinator, the party DP-SGD
protects the examples from. So the device holds a floor of its own and refuses (:class:`FloorRefused`,
a reply with ``declined`` and the reason) any round that asks for less privacy than it: DP off while
DP is required, a larger ε, or a larger δ. A smaller ε or δ is always accepted.

Where the floor comes from, first match wins:

1. the node config: ``dp-max-epsilon`` (any value makes DP required, since DP off is ε = ∞) and
   ``dp-max-delta`` (default 1e-5 once ``dp-max-epsilon`` is set). The device's owner sets these;
2. the device's privacy account: once a device has trained with DP it keeps the ε and δ its account
   was opened at, so DP stays required and neither can grow (the coordinator cannot switch off or
   loosen a promise it made once);
3. nothing: a device that never trained with DP and has no ceiling of its own follows the
   coordinator, DP off included (how DP-off fleets keep working).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetlora.client.device_state import UserConfig
from fleetlora.common.config import PrivacySettings
from fleetlora.common.errors import ConfigError, FleetloraError

DP_MAX_EPSILON = "dp-max-epsilon"  # node config key: the largest ε this device ever spends; DP required
DP_MAX_DELTA = "dp-max-delta"  # node config key: the largest δ it accepts
DEFAULT_MAX_DELTA = 1e-5  # with dp-max-epsilon but no dp-max-delta: fleetlora's default δ


class Declined(FleetloraError):
    """The device will not train this round; the message travels in its reply (``declined``)."""


class FloorRefused(Declined):
    """The round asks for less privacy than the device's floor; the message names the setting."""


@dataclass(frozen=True)
class PrivacyFloor:
    """The largest ε and δ the device accepts, and where that came from (said in every refusal)."""

    max_epsilon: float = math.inf  # inf: DP not required
    max_delta: float = 1.0
    source: str = "no floor set"

    @property
    def requires_dp(self) -> bool:
        return math.isfinite(self.max_epsilon)

    def admit(self, request: PrivacySettings) -> None:
        """Raise :class:`FloorRefused` unless ``request`` is at least as private as this floor."""
        if not request.enabled:
            if self.requires_dp:
                raise FloorRefused(
                    f"privacy floor: this device trains only with DP at ε ≤ {self.max_epsilon:g} "
                    f"({self.source}); the round asked for DP off"
                )
            return
        if request.epsilon > self.max_epsilon:
            raise FloorRefused(
                f"privacy floor: the round asks ε {request.epsilon:g}, above this device's "
                f"ε ≤ {self.max_epsilon:g} ({self.source})"
            )
        if request.delta > self.max_delta:
            raise FloorRefused(
                f"privacy floor: the round asks δ {request.delta:g}, above this device's "
                f"δ ≤ {self.max_delta:g} ({self.source})"
            )


def configured_floor(node_config: UserConfig) -> PrivacyFloor | None:
    """The floor the device's owner set in its node config, or None if they set none."""
    if DP_MAX_EPSILON not in node_config and DP_MAX_DELTA not in node_config:
        return None
    epsilon = _number(node_config, DP_MAX_EPSILON, math.inf)
    delta = _number(node_config, DP_MAX_DELTA, DEFAULT_MAX_DELTA)
    if not epsilon > 0:
        raise ConfigError(f"Node config {DP_MAX_EPSILON} must be > 0, got {epsilon:g}.")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"Node config {DP_MAX_DELTA} must be in (0, 1), got {delta:g}.")
    return PrivacyFloor(epsilon, delta, f"its node config {DP_MAX_EPSILON}/{DP_MAX_DELTA}")


def _number(node_config: UserConfig, key: str, default: float) -> float:
    if key not in node_config:
        return default
    raw = node_config[key]
    if isinstance(raw, bool):
        raise ConfigError(f"Node config {key} must be a number, got {raw!r}.")
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"Node config {key} must be a number, got {raw!r}.") from exc
    if math.isnan(value):
        raise ConfigError(f"Node config {key} must be a number, got NaN.")
    return value
