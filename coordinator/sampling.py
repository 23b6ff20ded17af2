"""Which devices train in a round: drawn over device ids, so one seed trains one schedule.

When more devices are online than a round takes, the draw orders the online nodes by device id
(:mod:`.identities`; nodes not known yet are asked), puts the devices whose new records drifted
first (while they are not above their fair share of rounds: :meth:`Sampler.draw`) and those known not
to be eligible (a gate closed, or a decline since their last status reply) last, and shuffles each
group with the round's generator:

- ``sampling = "seeded"`` (the table's default, so every simulation): ``random.Random(f"{seed}:{round}")``.
  The round's devices are then a pure function of (seed, round, the device ids online outside
  quarantine, those that want to train, those not eligible), whatever node ids Flower drew: two runs,
  or two arms of a benchmark, with one seed train the same partitions in the same rounds.
- ``sampling = "random"`` (what ``fleetlora coordinator round start`` sends unless the host's
  ``[federation]`` asks for ``seeded``): ``random.SystemRandom()``, the OS's entropy. Nobody who knows
  the run config can predict who trains when, which the central-DP accountant's amplification by
  sampling assumes.

When every online device trains there is nothing to draw and no one is asked; their train replies
name them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection

from flwr.app import Message
from flwr.serverapp import Grid

from fleetlora.coordinator.identities import DeviceNames


class Sampler:
    """Draws each round's devices from the online nodes (see the module docstring)."""

    def __init__(self, grid: Grid, *, count: int, seed: int | None, ttl: float) -> None:
        """``seed`` None: every draw comes from the OS's entropy; ``ttl``: seconds a query may wait."""
        self.count, self.seed = count, seed
        self.names = DeviceNames(grid, ttl=ttl)
        self._drawn: dict[int, int] = {}  # node → rounds it was drawn in, this run
        self._fair_share = 0.0  # the rounds an average device was due this run: Σ count / online

    def draw(
        self,
        round_number: int,
        online: list[int],
        wanting: set[int],
        deadline: float,
        *,
        ineligible: Collection[int] = (),
    ) -> list[int]:
        """Up to ``count`` of ``online``, ``wanting`` first, ``ineligible`` last; unknown ids are asked
        until ``deadline``.

        Wanting to train (a device's unauthenticated report that its records drifted) moves a device
        earlier, never above its fair share: while it was drawn in fewer rounds than an average
        device was due it goes first, and once it is at or above that share it goes last, so a device
        that always says it wants is drawn as often as the rest, give or take one round. A device not
        eligible (it said a gate is closed, or declined since) goes after all of them, wanting or not:
        it would likely decline, but is still drawn when too few others are online, since it may have
        become eligible since it last said.
        """
        if len(online) <= self.count:
            return list(online)
        names = self.names.of(online, deadline)
        wanting = wanting & set(online)  # a stored wish of a node that is gone counts for nothing
        self._fair_share += self.count / len(online)
        behind = {node for node in wanting if self._drawn.get(node, 0) < self._fair_share}
        rng = random.SystemRandom() if self.seed is None else random.Random(f"{self.seed}:{round_number}")
        drawn = sample_devices(
            online,
            self.count,
            behind,
            rng,
            name=names.__getitem__,
            last=wanting - behind,
            ineligible=ineligible,
        )
        for node in drawn:  # by node: the SuperLink proves it; a name is only what the device says
            self._drawn[node] = self._drawn.get(node, 0) + 1
        return drawn

    def participations(self, online: list[int], rounds: range, deadline: float) -> dict[int, int]:
        """How many of ``rounds`` each online device is planned to train in, if the fleet stays as it is.

        Seeded: replayed exactly from the draws (without drift or eligibility, which nobody can
        foresee); random: the expected count, rounded up. A device's DP noise is planned for this
        (docs/security.md): a device that is sampled more often than planned stops when its records are
        spent, never later.
        """
        if len(online) <= self.count:
            return dict.fromkeys(online, len(rounds))
        if self.seed is None:
            return dict.fromkeys(online, max(1, math.ceil(len(rounds) * self.count / len(online))))
        names = self.names.of(online, deadline)
        counts = dict.fromkeys(online, 0)
        for round_number in rounds:
            rng = random.Random(f"{self.seed}:{round_number}")
            for node in sample_devices(online, self.count, set(), rng, name=names.__getitem__):
                counts[node] += 1
        return counts

    def learn(self, reply: Message) -> None:
        """A reply that names its device (a train reply) saves asking it."""
        self.names.learn(reply)

    def named(self, sampled: list[int], online: list[int]) -> list[str]:
        """The sampled devices' ids: in the order drawn, or by id when all of ``online`` trained (no draw)."""
        names = [self.names.name(node) for node in sampled]
        return sorted(names) if len(sampled) == len(online) else names


def sample_devices(
    online: list[int],
    count: int,
    wanting: set[int],
    rng: random.Random,
    *,
    name: Callable[[int], str] | None = None,
    last: Collection[int] = (),
    ineligible: Collection[int] = (),
) -> list[int]:
    """``count`` of the ``online`` nodes, at random: those in ``wanting`` first, those in ``last`` after
    the rest, and those in ``ineligible`` after everyone (in ``wanting`` or ``last`` too).

    The nodes are sorted by ``name`` (ties, two nodes claiming one name, by node id; without
    ``name``, by node id) before ``rng`` shuffles each group, so the draw depends on the set of names
    and not on the order the nodes came in or on their ids. An empty group draws nothing from ``rng``,
    so a fleet with no ineligible device is drawn as it was before eligibility existed.
    """
    ordered = sorted(online, key=(lambda node: (name(node), node)) if name else None)
    eligible = [node for node in ordered if node not in ineligible]
    groups = [
        [node for node in eligible if node in wanting],
        [node for node in eligible if node not in wanting and node not in last],
        [node for node in eligible if node in last and node not in wanting],
        [node for node in ordered if node in ineligible],
    ]
    for group in groups:
        rng.shuffle(group)
    return [node for group in groups for node in group][: min(count, len(online))]
