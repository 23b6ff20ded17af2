"""How far one device can move a round: its weight and its delta's norm are bounded.

FedAvg weights each delta by the example count its device reports, and a delta's values are
otherwise checked only for finiteness, so one enrolled device that claims 10⁹ examples, or sends a
finite delta scaled ×1000 (or 1e30 in one coordinate), decides the round and can leave a global
adapter no device will run. The bounds of a round are fixed before its first reply arrives, so the
streaming mean keeps its O(adapter) memory and one reply is judged alone:

- **weight**: a device counts at most ``weight_cap`` × the median example count of the devices
  accepted in the previous round (devices' data volumes change slowly). A resumed run takes the stored
  round's counts; a new lineage's first round has no history and no weight cap;
- **norm**: a delta is dropped when its L2 norm passes ``norm_cap`` × the previous round's median
  accepted norm, or, in every round including the first, ``norm_ratio`` × the norm of the global
  adapter it was trained from (at least 1): ``delta norm N above the round's bound B (…)``.

A cap of 0 turns that bound off. The defaults are far from an honest fleet: BANKING77's 20 devices
(Dirichlet 0.5) hold 0.62–1.16× their median count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from fleetlora.common.errors import ConfigError


@dataclass(frozen=True)
class InfluenceSettings:
    """The caps, each relative to what the coordinator already knows (0: off)."""

    weight_cap: float = 4.0  # × the previous round's median example count
    norm_cap: float = 10.0  # × the previous round's median delta norm
    norm_ratio: float = 100.0  # × the norm of the global adapter sent, at least 1

    def __post_init__(self) -> None:
        for name in ("weight_cap", "norm_cap", "norm_ratio"):
            value = getattr(self, name)
            if not (value == 0 or 1 <= value < math.inf):
                raise ConfigError(
                    f"{name.replace('_', '-')} must be 0 (off) or a finite number >= 1, got {value}."
                )


@dataclass(frozen=True)
class Accepted:
    """What the previous round accepted: each participant's example count and delta norm (the norms are
    not stored with a version, so a resumed run starts without them)."""

    examples: tuple[int, ...]
    norms: tuple[float, ...]


@dataclass(frozen=True)
class RoundBounds:
    """One round's bounds on a device's weight and its delta's norm (inf: none)."""

    max_weight: float = math.inf
    max_norm: float = math.inf
    why: str = ""  # what the norm bound came from, for the drop reason

    @classmethod
    def for_round(
        cls, settings: InfluenceSettings, adapter_norm: float, previous: Accepted | None
    ) -> RoundBounds:
        weight, norms = math.inf, {}
        if settings.norm_ratio:
            norms[f"{settings.norm_ratio:g} × the global adapter's norm"] = settings.norm_ratio * max(
                1.0, adapter_norm
            )
        if previous is not None and previous.examples:
            if settings.weight_cap:
                weight = settings.weight_cap * statistics.median(previous.examples)
            if settings.norm_cap and previous.norms:
                norms[f"{settings.norm_cap:g} × the last round's median"] = (
                    settings.norm_cap * statistics.median(previous.norms)
                )
        if not norms:
            return cls(max_weight=weight)
        why, bound = min(norms.items(), key=lambda item: item[1])
        return cls(max_weight=weight, max_norm=bound, why=why)

    def weight(self, examples: int) -> float:
        """The weight a device reporting ``examples`` gets."""
        return min(float(examples), self.max_weight)

    def norm_problem(self, norm: float) -> str | None:
        if norm <= self.max_norm:
            return None
        return f"delta norm {norm:.4g} above the round's bound {self.max_norm:.4g} ({self.why})"


def accepted(examples: Mapping[int, int], norms: Mapping[int, float]) -> Accepted:
    """A round's participants as the next round's history."""
    return Accepted(tuple(examples.values()), tuple(norms[node] for node in examples))
