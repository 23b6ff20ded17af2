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
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from opacus.accountants import RDPAccountant

from fleetlora.common.delta import State
from fleetlora.common.errors import ConfigError


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


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


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


def epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` after the rounds in ``history`` (noise multiplier, sample rate, steps)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))
