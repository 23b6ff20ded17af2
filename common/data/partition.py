"""Split a data set over simulated devices: IID, or non-IID by a Dirichlet prior over labels.

Pure functions of (data, number of devices, seed): every simulated device computes the same
partition on its own, so nothing has to ship partitions around. The Dirichlet scheme is the one of
Hsu et al. 2019 (arXiv:1909.06335): for each label, the shares of its examples across devices are
drawn from Dir(alpha); small alpha gives each device few labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetlora.common.errors import ConfigError

_MAX_DRAWS = 100


@dataclass(frozen=True)
class PartitionScheme:
    """``iid`` or ``dirichlet`` with its concentration ``alpha``."""

    kind: str
    alpha: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> PartitionScheme:
        """Read ``iid`` or ``dirichlet:ALPHA`` (ALPHA > 0)."""
        kind, _, value = spec.strip().lower().partition(":")
        if kind == "iid" and not value:
            return cls("iid")
        if kind == "dirichlet":
            try:
                alpha = float(value)
            except ValueError:
                alpha = -1.0
            if alpha > 0:
                return cls("dirichlet", alpha)
        raise ConfigError(f"Partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0, got {spec!r}.")


def partition_indices(
    labels: Sequence[str | None], num_parts: int, scheme: PartitionScheme, seed: int
) -> list[list[int]]:
    """Indices of each device's examples; every index lands in exactly one non-empty part."""
    if num_parts < 1:
        raise ConfigError(f"Number of devices must be >= 1, got {num_parts}.")
    if len(labels) < num_parts:
        raise ConfigError(f"Cannot split {len(labels)} examples over {num_parts} devices.")
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid":
        order = rng.permutation(len(labels))
        return [sorted(part.tolist()) for part in np.array_split(order, num_parts)]
    if any(label is None for label in labels):
        raise ConfigError("A Dirichlet partition needs labelled data; use --partition iid.")
    return _dirichlet(labels, num_parts, scheme.alpha, rng)


def _dirichlet(
    labels: Sequence[str | None], num_parts: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(str(label), []).append(index)
    # Redraw until every device holds something; small alpha with many devices may need a few.
    for _ in range(_MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for label in sorted(by_label):
            indices = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for part, chunk in zip(parts, np.split(indices, cuts), strict=True):
                part.extend(chunk.tolist())
        if all(parts):
            return [sorted(p) for p in parts]
    # Many devices for the data (a thousand devices of a few examples each): the last draw, with each empty
    # device given one example from the largest part (there are at least as many examples as devices).
    for empty in (part for part in parts if not part):
        empty.append(max(parts, key=len).pop())
    return [sorted(p) for p in parts]


def phase_labels(labels: Sequence[str], phases: int, seed: int) -> tuple[tuple[str, ...], ...]:
    """A class-incremental stream's phases: the labels shuffled by ``seed`` and cut into ``phases``
    groups of near-equal size, each in the labels' own order. A pure function, so every simulated
    device and the scenario's evaluation agree on which intents each phase brings."""
    if not 1 <= phases <= len(labels):
        raise ConfigError(f"stream-phases must be between 1 and the {len(labels)} labels, got {phases}.")
    order = np.random.default_rng(seed).permutation(len(labels))
    position = {label: i for i, label in enumerate(labels)}
    return tuple(
        tuple(sorted((labels[i] for i in group), key=position.__getitem__))
        for group in np.array_split(order, phases)
    )


def phase_of_round(round_number: int, phase_rounds: int, phases: int) -> int:
    """Which phase (1-based) a round belongs to; rounds after the last phase stay in it."""
    return min(phases, max(1, (round_number - 1) // phase_rounds + 1))
