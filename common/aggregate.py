"""Weighted averaging of adapter deltas, streamed: memory O(adapter), not O(devices × adapter).

Each device's delta is folded into a float64 running sum as its reply arrives, then dropped. The
result is the FedAvg update of McMahan et al. 2017 (arXiv:1602.05629) applied to deltas:
``sum_i n_i * delta_i / sum_i n_i`` with ``n_i`` the device's example count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fleetlora.common.delta import State, check_layout


class WeightedMean:
    """A running weighted mean of same-layout states."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._reference = {n: t.detach() for n, t in reference.items()}
        self._sum: dict[str, torch.Tensor] = {
            n: torch.zeros_like(t, dtype=torch.float64) for n, t in reference.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], *, weight: float) -> None:
        """Fold in one state; ``weight`` must be positive (an example count)."""
        if not weight > 0:
            raise ValueError(f"Weight must be positive, got {weight}.")
        check_layout(state, self._reference)
        for name, tensor in state.items():
            self._sum[name].add_(tensor.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> State:
        """The weighted mean, in each array's original dtype."""
        if self.count == 0:
            raise ValueError("No state was added; there is nothing to average.")
        return {
            name: (total / self.total_weight).to(self._reference[name].dtype)
            for name, total in self._sum.items()
        }
