"""Coordinate-wise robust aggregation: the trimmed mean and the median (Yin et al. 2018, arXiv:1803.01498).

The default mean bounds a device's influence by its capped weight and its delta's norm
(:mod:`fleetlora.coordinator.influence`), but within those bounds one device still moves every
coordinate. A coordinate-wise trimmed mean sorts each coordinate's values over the round's accepted
deltas and averages all but the ``k`` smallest and ``k`` largest, with ``k = ⌊trim · n⌋``; the median is
the trimmed mean that keeps only the middle value (two middle values, averaged, for an even ``n``). Up
to ``k`` attackers then cannot move a coordinate outside the range the honest values span.

What it costs:

- **memory**: every accepted delta is kept until the round releases, O(devices × adapter) in
  float32, where the mean streams in O(adapter); a MiniLM head (77 × 384) is 118 KB a device, a
  MiniLM r = 8 LoRA adapter about 0.6 MB, so a 1,000-device round buffers about 0.6 GB;
- **weights**: example counts are ignored (every accepted device counts once), so a claimed count
  cannot shift the result, and a device with little data counts as much as one with much;
- **utility**: with few devices a round or non-IID data the honest extremes are trimmed too;
  ``benchmarks/aggregation_attacks.py`` measures both sides on BANKING77.

Central DP calibrates its noise to the sensitivity of a clipped *sum*; the trimmed mean has a
different sensitivity, so the two are refused together (``coordinator/settings.py``).
"""

from __future__ import annotations

import torch

from fleetlora.common.delta import State, check_layout
from fleetlora.coordinator.aggregation import Release

AGGREGATOR_TRIMMED = "aggregator_trimmed"  # version metric: values cut from each end of every coordinate


def values_trimmed(count: int, trim: float) -> int:
    """Values cut from each end of a coordinate of ``count`` values: ⌊trim·count⌋, leaving at least one."""
    return min(int(trim * count), (count - 1) // 2)


class CoordinateTrimmedMean:
    """The coordinate-wise ``trim``-trimmed mean of a round's deltas; ``trim = 0.5`` is the median."""

    def __init__(self, reference: State, trim: float) -> None:
        if not 0 <= trim <= 0.5:
            raise ValueError(f"trim must be in [0, 0.5], got {trim}.")
        self._reference = reference
        self._trim = trim
        self._deltas: list[State] = []

    def add(self, delta: State, *, examples: float) -> None:
        """Keep the delta for the release; ``examples`` is ignored (every device counts once)."""
        check_layout(delta, self._reference)
        self._deltas.append({name: tensor.to(torch.float32) for name, tensor in delta.items()})

    def release(self, *, sampled: int, online: int) -> Release:
        if not self._deltas:
            raise ValueError("No delta was added; there is nothing to aggregate.")
        count = len(self._deltas)
        cut = values_trimmed(count, self._trim)
        update: State = {}
        for name, reference in self._reference.items():
            ordered = torch.stack([delta[name] for delta in self._deltas]).sort(dim=0).values
            update[name] = ordered[cut : count - cut].mean(dim=0).to(reference.dtype)
        self._deltas.clear()  # the buffer is the round's largest allocation: free it with the release
        return Release(update, {AGGREGATOR_TRIMMED: float(cut)})
