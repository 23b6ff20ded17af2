"""User-level differential privacy at the coordinator (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963).

Each device's delta is clipped to L2 norm ``clip_norm``, the clipped deltas are summed with equal
weight, Gaussian noise with standard deviation ``noise_multiplier × clip_norm`` is added to the sum,
and the result is divided by the number of devices *sampled* (a fixed denominator, so one device
can move the update by at most ``clip_norm / sampled``). Example counts no longer weight the
average: an unbounded weight would be an unbounded sensitivity.

The guarantee is user-level (device-level): whether any one device took part at all, including
all its examples, over the rounds run. It is accounted with Opacus' RDP accountant, treating each
round as one step at sample rate q = sampled / online devices. The accountant assumes Poisson
sampling while rounds sample a fixed number of devices without replacement; the usual
approximation in the literature, written down here rather than hidden.

:class:`CentralDPMean` applies all of it by wrapping the round's plain mean (as Flower's
``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy), so neither the aggregator nor the
round branches on whether central DP is on. :class:`CentralDPAccountant` holds the lineage's noised
rounds as :class:`CentralDPRound` values; each version's metrics record its round under the
``central_dp_*`` keys, which is how a restarted coordinator reads the history back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fleetlora.common.delta import State, l2_norm
from fleetlora.common.dp_accounting import epsilon_from_history
from fleetlora.common.errors import ConfigError
from fleetlora.coordinator.aggregation import DeltaMean, Release

# A version's metrics under central DP (results.json and the operator docs read these keys).
CENTRAL_DP_EPSILON = "central_dp_epsilon"
CENTRAL_DP_NOISE = "central_dp_noise_multiplier"
CENTRAL_DP_SAMPLE_RATE = "central_dp_sample_rate"
CENTRAL_DP_CLIPPED = "central_dp_clipped"


@dataclass(frozen=True)
class CentralDPSettings:
    noise_multiplier: float = 0.0  # 0: off
    clip_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0:
            raise ConfigError(f"central-dp-noise must be >= 0 (0 = off), got {self.noise_multiplier}.")
        if not self.clip_norm > 0:
            raise ConfigError(f"central-dp-clip must be > 0, got {self.clip_norm}.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"central-dp-delta must be in (0, 1), got {self.delta}.")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


def clip(delta: Mapping[str, torch.Tensor], bound: float) -> tuple[State, bool]:
    """``delta`` scaled to L2 norm at most ``bound``, and whether it had to be scaled."""
    norm = l2_norm(delta)
    if norm <= bound:
        return dict(delta), False
    scale = bound / norm
    return {name: tensor * scale for name, tensor in delta.items()}, True


def privatize(
    mean_of_clipped: Mapping[str, torch.Tensor], contributors: int, sampled: int, dp: CentralDPSettings
) -> State:
    """(sum of the clipped deltas + N(0, (σ·S)²)) / sampled, from their plain mean over ``contributors``."""
    generator = torch.Generator().manual_seed(secrets.randbits(63))  # never the public run seed
    std = dp.noise_multiplier * dp.clip_norm
    out: State = {}
    for name, mean in mean_of_clipped.items():
        total = mean.double() * contributors
        noise = torch.normal(0.0, std, size=mean.shape, generator=generator, dtype=torch.float64)
        out[name] = ((total + noise) / sampled).to(mean.dtype)
    return out


# ---- accounting over a lineage's rounds ------------------------------------------------------


@dataclass(frozen=True)
class CentralDPRound:
    """One noised release: one step of the accountant's history, and what its version records."""

    noise_multiplier: float
    sample_rate: float  # devices sampled / devices online
    epsilon: float  # at the settings' δ, composed with every earlier noised round of the lineage
    clipped: int  # deltas scaled down to the clip norm

    def as_metrics(self) -> dict[str, float]:
        return {
            CENTRAL_DP_EPSILON: self.epsilon,
            CENTRAL_DP_NOISE: self.noise_multiplier,
            CENTRAL_DP_SAMPLE_RATE: self.sample_rate,
            CENTRAL_DP_CLIPPED: float(self.clipped),
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> CentralDPRound | None:
        """The round a version's metrics record, or None for a version released without central DP."""
        if CENTRAL_DP_SAMPLE_RATE not in metrics:
            return None
        return cls(
            noise_multiplier=float(metrics[CENTRAL_DP_NOISE]),
            sample_rate=float(metrics[CENTRAL_DP_SAMPLE_RATE]),
            epsilon=float(metrics[CENTRAL_DP_EPSILON]),
            clipped=int(metrics[CENTRAL_DP_CLIPPED]),
        )


class CentralDPAccountant:
    """The lineage's noised rounds so far (oldest first), and the ε each new one brings it to."""

    def __init__(self, settings: CentralDPSettings, history: Iterable[CentralDPRound] = ()) -> None:
        self.settings = settings
        self.history = list(history)

    @classmethod
    def from_version_metrics(
        cls, settings: CentralDPSettings, chain: Iterable[Mapping[str, Any]]
    ) -> CentralDPAccountant:
        """From the metrics of a version and its ancestors, newest first (``Registry.chain``)."""
        noised = (CentralDPRound.from_metrics(metrics) for metrics in chain)
        return cls(settings, reversed([r for r in noised if r is not None]))

    def spend(self, *, sample_rate: float, clipped: int) -> CentralDPRound:
        """Record one more noised round at ``sample_rate``; it composes with the history (one step each)."""
        steps = [(r.noise_multiplier, r.sample_rate, 1) for r in self.history]
        steps.append((self.settings.noise_multiplier, sample_rate, 1))
        spent = CentralDPRound(
            noise_multiplier=self.settings.noise_multiplier,
            sample_rate=sample_rate,
            epsilon=epsilon_from_history(steps, delta=self.settings.delta),
            clipped=clipped,
        )
        self.history.append(spent)
        return spent


class CentralDPMean:
    """Wraps a round's :class:`DeltaMean`: clip each delta, weigh devices equally, noise the release."""

    def __init__(self, inner: DeltaMean, accountant: CentralDPAccountant) -> None:
        self._inner = inner
        self._accountant = accountant
        self._contributors = 0
        self._clipped = 0

    def add(self, delta: State, *, examples: float) -> None:
        clipped, was_clipped = clip(delta, self._accountant.settings.clip_norm)
        # Weight 1, not the example count: an unbounded weight would be an unbounded sensitivity.
        self._inner.add(clipped, examples=1)
        self._contributors += 1
        self._clipped += was_clipped

    def release(self, *, sampled: int, online: int) -> Release:
        mean = self._inner.release(sampled=sampled, online=online)
        noised = privatize(mean.delta, self._contributors, sampled, self._accountant.settings)
        spent = self._accountant.spend(sample_rate=sampled / online, clipped=self._clipped)
        return Release(noised, {**mean.metrics, **spent.as_metrics()})
