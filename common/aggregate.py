"""Weighted averaging of adapter deltas, streamed: memory O(adapter), not O(devices × adapter).

Each device's delta is folded into a float64 running sum as its reply arrives, then dropped. The
result is the FedAvg update of McMahan et al. 2017 (arXiv:1602.05629) applied to deltas:
``sum_i n_i * delta_i / sum_i n_i`` with ``n_i`` the device's example count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fleetlora.common.delta import PIECE_VALUES, State, check_layout, packed


class WeightedMean:
    """A running weighted mean of same-layout states."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._reference = {n: t.detach() for n, t in reference.items()}
        # The float64 sums, by name, are views of one buffer in name order (a decoded fp32 delta's order).
        self._names = sorted(reference)
        total = torch.zeros(sum(reference[n].numel() for n in self._names), dtype=torch.float64)
        self._pieces = total.split(PIECE_VALUES)  # as common.delta.packed splits a packed state
        parts = dict(zip(self._names, total.split([reference[n].numel() for n in self._names]), strict=True))
        self._sum: dict[str, torch.Tensor] = {n: parts[n].view(t.shape) for n, t in reference.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], *, weight: float) -> None:
        """Fold in one state; ``weight`` must be positive (an example count).

        Each value is added to its float64 sum as float64 (type promotion: no float64 copy of the state
        is made), a few calls when the state is packed in name order as the sums are (common.delta.packed),
        else one per array; the sums come out the same to the bit either way.
        """
        if not weight > 0:
            raise ValueError(f"Weight must be positive, got {weight}.")
        check_layout(state, self._reference)
        pieces = packed(state, self._names)
        if pieces is not None:
            for total, piece in zip(self._pieces, pieces, strict=True):
                total.add_(piece, alpha=weight)
        else:
            for name, tensor in state.items():
                self._sum[name].add_(tensor, alpha=weight)
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
