"""How far one device can move a round: its weight and its delta's norm are bounded.

FedAvg weights each delta by the example count its device reports, and a delta's values are
otherwise checked only for finiteness, so one enrolled device that claims 10⁹ examples, or sends a
finite delta scaled ×1000 (or 1e30 in one coordinate), decides the round and can leave a global
adapter no device will run. The bounds of a round come from the previous round, so they are fixed
before its first reply arrives, the streaming mean keeps its O(adapter) memory and one reply is
judged alone:

- **weight**: a device counts at most ``weight_cap`` × the median example count of the devices
  accepted in the previous round (devices' data volumes change slowly). A resumed run takes the stored
  round's counts; a new lineage's first round, which has no history, takes its own median, and holds
  its deltas back until all are in (``RoundBounds.settle``);
- **norm**: a delta is dropped when its L2 norm passes ``norm_cap`` × the previous round's median
  accepted norm (this round's own median when no norms are known: a first or resumed round; never
  below the global adapter's norm, at least 1), or, in every round, ``norm_ratio`` × the norm of the
  global adapter it was trained from (at least 1): ``delta norm N above the round's bound B (…)``.

A cap of 0 turns that bound off. The defaults are far from an honest fleet: BANKING77's 20 devices
(Dirichlet 0.5) hold 0.62–1.16× their median count.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleetlora.common.errors import ConfigError

AGGREGATORS = ("mean", "trimmed-mean", "median")
# From this many devices a round, `auto` trims: with 20 a round one device inside the norm bound wrecked the
# mean (3% after a colluding push, 27% after noise) and cost the trimmed mean 1.5 and 6 points, with the
# same clean accuracy (benchmarks/results/aggregation_attacks_20.json). Below it a trim cuts too few
# values to matter and the mean held every attack but sign-flip (aggregation_attacks.json, 5 a round).
ROBUST_MIN_DEVICES = 10


def default_aggregator(devices_per_round: int, central_dp: bool) -> str:
    """What ``aggregator = "auto"`` means: the trimmed mean for rounds of ``ROBUST_MIN_DEVICES`` or more,
    unless central DP is on (its noise is calibrated to the clipped sum of a mean); else the mean."""
    return "trimmed-mean" if devices_per_round >= ROBUST_MIN_DEVICES and not central_dp else "mean"


@dataclass(frozen=True)
class InfluenceSettings:
    """The caps, each relative to what the coordinator already knows (0: off)."""

    weight_cap: float = 2.0  # × the last round's median example count (at 4 an inflated claim cost 2.6 pts)
    norm_cap: float = 10.0  # × the previous round's median delta norm
    norm_ratio: float = 100.0  # × the norm of the global adapter sent, at least 1
    aggregator: str = "mean"  # "mean" | "trimmed-mean" | "median" (coordinator/robust.py)
    aggregator_trim: float = 0.2  # trimmed-mean: share of each coordinate cut from each end
    quarantine_after: int = 3  # anomalies before a device is kept out of rounds (0: never)

    def __post_init__(self) -> None:
        for name in ("weight_cap", "norm_cap", "norm_ratio"):
            value = getattr(self, name)
            if not (value == 0 or 1 <= value < math.inf):
                raise ConfigError(
                    f"{name.replace('_', '-')} must be 0 (off) or a finite number >= 1, got {value}."
                )
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}.")
        if self.quarantine_after < 0:
            raise ConfigError(f"quarantine-after must be >= 0 (0: never), got {self.quarantine_after}.")
        if not 0 < self.aggregator_trim < 0.5:
            raise ConfigError(f"aggregator-trim must be in (0, 0.5), got {self.aggregator_trim}.")

    @property
    def trim(self) -> float | None:
        """The share cut from each end of a coordinate; None for the example-weighted mean."""
        return {"mean": None, "median": 0.5}.get(self.aggregator, self.aggregator_trim)


@dataclass(frozen=True)
class Accepted:
    """What the previous round accepted: each participant's example count and delta norm (the norms are
    not stored with a version, so a resumed run starts without them)."""

    examples: tuple[int, ...]
    norms: tuple[float, ...]


@dataclass(frozen=True)
class RoundBounds:
    """One round's bounds on a device's weight and its delta's norm (inf: none).

    The norm bound is the smaller of an **absolute** one, ``norm_ratio`` × the global adapter's norm
    (at least 1), and a **relative** one, ``norm_cap`` × a median of devices' norms, which never goes
    below the adapter's own norm (at least 1): a majority sending tiny deltas cannot push the bound
    under honest ones. Only a delta beyond the absolute bound is an anomaly (coordinator/quarantine.py);
    the relative bound depends on what other devices sent, so failing it proves nothing about a device.

    A bound whose history is missing (a new lineage's first round; a resumed run has counts but no
    norms) comes from this round itself: ``weight_cap_here`` / ``norm_cap_here`` × the median over the
    round's accepted replies, known only once they are all in, so such a round holds its deltas back
    until :meth:`settle` (O(devices × adapter) for that round) where the others stream.
    """

    max_weight: float = math.inf
    absolute: float = math.inf
    absolute_why: str = ""
    relative: float = math.inf
    relative_why: str = ""
    floor: float = 0.0  # the relative bound is never below this
    weight_cap_here: float = 0.0  # > 0: the weight bound is this × this round's median example count
    norm_cap_here: float = 0.0  # > 0: the relative bound is this × this round's median norm

    @classmethod
    def for_round(
        cls, settings: InfluenceSettings, adapter_norm: float, previous: Accepted | None
    ) -> RoundBounds:
        weight, absolute, relative = math.inf, math.inf, math.inf
        weight_here = norm_here = 0.0
        if settings.norm_ratio:
            absolute = settings.norm_ratio * max(1.0, adapter_norm)
        examples = previous.examples if previous else ()
        previous_norms = previous.norms if previous else ()
        if settings.weight_cap:
            if examples:
                weight = settings.weight_cap * statistics.median(examples)
            else:
                weight_here = settings.weight_cap
        if settings.norm_cap:
            if previous_norms:
                relative = settings.norm_cap * statistics.median(previous_norms)
            else:
                norm_here = settings.norm_cap
        return cls(
            max_weight=weight,
            absolute=absolute,
            absolute_why=f"{settings.norm_ratio:g} × the global adapter's norm",
            relative=relative,
            relative_why=f"{settings.norm_cap:g} × the last round's median",
            floor=max(1.0, adapter_norm),
            weight_cap_here=weight_here,
            norm_cap_here=norm_here,
        )

    @property
    def max_norm(self) -> float:
        return min(self.absolute, max(self.relative, self.floor))

    @property
    def waits_for_round(self) -> bool:
        """Whether a bound comes from this round's own replies, so deltas wait for :meth:`settle`."""
        return bool(self.weight_cap_here or self.norm_cap_here)

    def settle(self, examples: Sequence[int], norms: Sequence[float]) -> RoundBounds:
        """The bounds once the round's accepted replies (their counts and norms) are all in."""
        weight, relative, why = self.max_weight, self.relative, self.relative_why
        if self.weight_cap_here and examples:
            weight = self.weight_cap_here * statistics.median(examples)
        if self.norm_cap_here and norms:
            relative = self.norm_cap_here * statistics.median(norms)
            why = f"{self.norm_cap_here:g} × this round's median"
        return dataclasses.replace(
            self,
            max_weight=weight,
            relative=relative,
            relative_why=why,
            weight_cap_here=0.0,
            norm_cap_here=0.0,
        )

    def weight(self, examples: int) -> float:
        """The weight a device reporting ``examples`` gets."""
        return min(float(examples), self.max_weight)

    def norm_problem(self, norm: float) -> str | None:
        if norm <= self.max_norm:
            return None
        why = self.absolute_why if self.absolute <= max(self.relative, self.floor) else self.relative_why
        return f"delta norm {norm:.4g} above the round's bound {self.max_norm:.4g} ({why})"

    def anomalous(self, norm: float) -> bool:
        """Whether a norm is beyond the absolute bound: no honest device sends that."""
        return norm > self.absolute


def accepted(examples: Mapping[int, int], norms: Mapping[int, float]) -> Accepted:
    """A round's participants as the next round's history."""
    return Accepted(tuple(examples.values()), tuple(norms[node] for node in examples))
