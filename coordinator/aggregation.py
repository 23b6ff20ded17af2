"""One round's replies → the update it releases, every check of a train reply in one place.

:class:`DeltaAggregator` has no I/O of its own. It takes each train reply through these checks, in
this order, and records the first failure as a :class:`Drop` with the reason shown (the checks are in
:mod:`fleetlora.coordinator.uploads`, one exception class each):

1. not a second reply from the same node: ``duplicate reply``;
2. the device did not decline: ``declined: <its reason>`` (also kept in ``declines``: the round marks
   its device not eligible until its next status reply, coordinator/rounds.py);
3. not a Flower error reply: ``device error: <reason>``;
4. metrics present (``reply has no metrics``), ``num-examples`` a positive ``int`` (``invalid
   num-examples: <value>``), every other metric a finite number (``metric '<key>' is a <type>, not a
   number``, ``metric '<key>' is nan, not a finite number``);
5. the ``dp_*`` metrics are taken out as a :class:`PrivacySpend`, kept whatever happens next because
   the device spent that budget either way (under the node's own name ``node-<id>`` when the upload is
   refused at step 6, since the device id it claims is then not proven);
6. open the upload: plain ``arrays`` (``reply has no arrays``), or a sealed upload, whose claim,
   enrolled device and node, signature and decryption are checked (``sealed upload refused: <reason>``);
7. a sealed upload decodes within the size bound (``sealed upload refused: decrypted upload is not a
   delta (<reason>)``), and its device is not in quarantine (``device <id> is in quarantine: …``);
8. layout: the names, shapes and dtypes of the global adapter (``layout mismatch: <difference>``);
9. finite: ``delta holds NaN or inf`` (told by the L2 norm of step 10, taken here: a NaN or inf value
   makes it non-finite, and only a non-finite norm has the values scanned for the reason);
10. norm within the round's bound (:mod:`fleetlora.coordinator.influence`): ``delta norm … above the
    round's bound …``; a failure at 8 or 9, or a norm beyond the absolute bound, is also an anomaly
    on the device the upload is proven to come from (:mod:`fleetlora.coordinator.quarantine`);
11. fold into the round's :class:`DeltaMean` with the example count, capped by the round's weight bound,
    as weight; the node becomes a participant, and its bytes and example-weighted metrics are counted.
    In a round without history (a new lineage's first), 10 and 11 wait for every reply: the bounds
    then come from the round's own medians (:meth:`DeltaAggregator.settle`, run by ``mark_missing``).

A wrapper around the :class:`DeltaMean` (central DP, :class:`~fleetlora.coordinator.central_dp.CentralDPMean`)
changes how accepted deltas are folded and released, never which replies are accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import Message

from fleetlora.common.aggregate import WeightedMean
from fleetlora.common.delta import State, l2_norm
from fleetlora.coordinator.identities import unnamed
from fleetlora.coordinator.influence import RoundBounds
from fleetlora.coordinator.storage.devices import Decline
from fleetlora.coordinator.uploads import (
    DeclinedReply,
    DuplicateReply,
    PrivacySpend,
    Quarantined,
    RejectedReply,
    ReplyMetrics,
    UploadOpener,
    check_finite,
    check_layout_of,
    check_not_declined,
    read_metrics,
    take_privacy_spend,
)

WEIGHTS_CAPPED = "weights_capped"  # version metric: participants whose example count the round's bound cut


@dataclass(frozen=True)
class Drop:
    """A device left out of a round, and why."""

    node_id: int
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"node_id": str(self.node_id), "reason": self.reason}


# ---- folding accepted deltas ------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The round's update, and what producing it adds to the new version's metrics."""

    delta: State
    metrics: dict[str, float] = field(default_factory=dict)


class DeltaMean(Protocol):
    """Folds one round's accepted deltas into the update the round releases."""

    def add(self, delta: State, *, examples: float) -> None:
        """Fold in a delta already checked for layout, finiteness and norm; ``examples`` is its weight."""

    def release(self, *, sampled: int, online: int) -> Release:
        """The update, once the round has its quorum (``sampled`` of ``online`` devices were asked)."""


class ExampleWeightedMean:
    """FedAvg on deltas: ``Σ n_i·Δ_i / Σ n_i`` over the accepted devices (McMahan et al. 2017)."""

    def __init__(self, reference: State) -> None:
        self._mean = WeightedMean(reference)

    def add(self, delta: State, *, examples: float) -> None:
        self._mean.add(delta, weight=examples)

    def release(self, *, sampled: int, online: int) -> Release:
        return Release(self._mean.result())


# ---- the replies ------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Weighted sums of scalar metrics, for a weighted mean over the accepted replies."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * value
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {key: total / self.weight for key, total in self.sums.items()} if self.weight else {}


@dataclass(frozen=True)
class _Opened:
    """A reply that passed every check but the round's bounds."""

    node: int
    device: str  # proven, or node-<id>
    delta: State
    norm: float
    metrics: ReplyMetrics
    upload_bytes: int


def _timeouts(sampled: Iterable[int], answered: set[int], drops: list[Drop], reason: str) -> list[Drop]:
    """Drops for the sampled devices that neither answered nor were already dropped."""
    seen = answered | {d.node_id for d in drops}
    return [Drop(n, reason) for n in sampled if n not in seen]


class DeltaAggregator:
    """Streams one round's train replies, in the order of checks above, into a :class:`DeltaMean`."""

    def __init__(
        self,
        reference: State,
        mean: DeltaMean,
        open_upload: UploadOpener,
        bounds: RoundBounds | None = None,
        held: frozenset[str] = frozenset(),
    ) -> None:
        """``held``: the devices in quarantine, whose uploads are refused once opened."""
        self._reference = reference  # the global adapter the round sent: the layout every delta must have
        self._mean = mean
        self._open_upload = open_upload
        self._bounds = bounds or RoundBounds()
        self._held_devices = held
        self._tally = _Tally()
        self.participants: dict[int, int] = {}  # node id → example count, as reported
        self.norms: dict[int, float] = {}  # node id → its delta's L2 norm
        self.weight_capped = 0  # participants whose weight the round's bound cut
        self.drops: list[Drop] = []
        self.upload_bytes = 0
        self.privacy: list[PrivacySpend] = []
        self.anomalies: list[tuple[str, str]] = []  # (device, what): an opened delta out of bounds or broken
        self.declines: list[Decline] = []  # replies that declined to train, with the device's reason
        self._seen: set[int] = set()  # nodes that replied, accepted or not
        self.held_nodes: set[int] = set()  # nodes whose upload came from a device in quarantine
        self._held: list[_Opened] = []  # accepted deltas waiting for the round's own bounds

    def add(self, reply: Message) -> None:
        try:
            self._accept(reply)
        except RejectedReply as exc:
            self.drops.append(Drop(reply.metadata.src_node_id, str(exc)))

    def _accept(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if node in self._seen:
            raise DuplicateReply("duplicate reply")
        self._seen.add(node)
        try:
            check_not_declined(reply)
        except DeclinedReply as exc:
            self.declines.append(Decline(node, exc.device_id, exc.reason))
            raise
        metrics = read_metrics(reply)
        spend = take_privacy_spend(reply, metrics)
        try:
            upload = self._open_upload(reply)
        except RejectedReply:
            if spend:  # spent either way, but the id it claims is not proven: the node speaks for itself
                self.privacy.append(dataclasses.replace(spend, device_id=unnamed(node)))
            raise
        if spend:
            self.privacy.append(spend)
        device = upload.device_id or unnamed(node)
        if device in self._held_devices:
            self.held_nodes.add(node)  # proven by its upload: left out of this run's later rounds
            raise Quarantined(f"device {device} is in quarantine: release it to let it train again")
        self.add_delta(node, upload.delta, metrics, device=device, upload_bytes=wire_bytes(reply))

    def add_delta(
        self, node: int, delta: State, metrics: ReplyMetrics, *, device: str, upload_bytes: int = 0
    ) -> None:
        """Checks 8–11 on an opened delta: layout, finite, norm, then fold (or hold until :meth:`settle`).

        ``device`` is who the delta is proven to come from (``node-<id>`` when nothing proves it): a
        failed check here drops the reply and is an anomaly flagged on it (coordinator/quarantine.py).
        """
        try:
            check_layout_of(delta, self._reference)
            norm = l2_norm(delta)
            # Any NaN or inf value makes the norm NaN or inf, so a finite norm proves every value finite;
            # only a non-finite one has the values scanned (finite float64 values that overflow the norm
            # pass the scan and fail the bound below, as they did before).
            if not math.isfinite(norm):
                check_finite(delta)
        except RejectedReply as exc:
            self._drop(node, device, str(exc), anomaly=True)
            return
        if problem := self._bounds.norm_problem(norm):
            self._drop(node, device, problem, anomaly=self._bounds.anomalous(norm))
            return
        opened = _Opened(node, device, delta, norm, metrics, upload_bytes)
        if self._bounds.waits_for_round:
            self._held.append(opened)
        else:
            self._fold(opened, self._bounds)

    def settle(self) -> None:
        """Fold the deltas a round without history held back, bounded by the round's own medians."""
        held, self._held = self._held, []
        bounds = self._bounds.settle([h.metrics.examples for h in held], [h.norm for h in held])
        for opened in held:
            if problem := bounds.norm_problem(opened.norm):  # the round's own median: not an anomaly
                self._drop(opened.node, opened.device, problem, anomaly=False)
            else:
                self._fold(opened, bounds)

    def _drop(self, node: int, device: str, reason: str, *, anomaly: bool) -> None:
        self.drops.append(Drop(node, reason))
        if anomaly:
            self.anomalies.append((device, reason))

    def _fold(self, opened: _Opened, bounds: RoundBounds) -> None:
        weight = bounds.weight(opened.metrics.examples)
        self.weight_capped += weight < opened.metrics.examples  # bounded, not flagged: large devices hit it
        self._mean.add(opened.delta, examples=weight)
        self.participants[opened.node] = opened.metrics.examples
        self.norms[opened.node] = opened.norm
        self.upload_bytes += opened.upload_bytes
        self._tally.add(opened.metrics.values, weight)

    @property
    def accepted(self) -> int:
        """Deltas that passed every check so far, folded or held for the round's own bounds."""
        return len(self.participants) + len(self._held)

    def mark_missing(self, sampled: Iterable[int], *, closed_early: bool = False) -> None:
        """Settle the held deltas, then record every sampled device that neither contributed nor was
        dropped: timed out, or not waited for when the round closed once it had enough."""
        self.settle()
        reason = "not waited for: the round had enough" if closed_early else "no reply before the deadline"
        self.drops.extend(_timeouts(sampled, set(self.participants), self.drops, reason))

    def release(self, *, sampled: int, online: int) -> Release:
        """The round's update; its metrics gain the example-weighted means of the devices' train metrics."""
        update = self._mean.release(sampled=sampled, online=online)
        capped = {WEIGHTS_CAPPED: float(self.weight_capped)} if self.weight_capped else {}
        return Release(update.delta, {**self._tally.means(), **update.metrics, **capped})


class MetricAggregator:
    """Streams evaluate replies into example-weighted mean metrics, named ``prefix + key``."""

    def __init__(self, prefix: str = "") -> None:
        self._tally = _Tally()
        self._prefix = prefix
        self.evaluated: set[int] = set()
        self.drops: list[Drop] = []
        self.examples = 0

    def add(self, reply: Message) -> None:
        try:
            check_not_declined(reply)  # a device with nothing held out says so
            metrics = read_metrics(reply)
        except RejectedReply as exc:
            self.drops.append(Drop(reply.metadata.src_node_id, f"evaluation: {exc}"))
            return
        self._tally.add(metrics.values, metrics.examples)
        self.evaluated.add(reply.metadata.src_node_id)
        self.examples += metrics.examples

    def mark_missing(self, sampled: Iterable[int]) -> None:
        self.drops.extend(
            _timeouts(sampled, self.evaluated, self.drops, "evaluation: no reply before the deadline")
        )

    def metrics(self) -> dict[str, float]:
        return {self._prefix + key: value for key, value in self._tally.means().items()}


def wire_bytes(reply: Message) -> int:
    """Bytes of array data a reply carried (a sealed upload's ciphertext, or the plain delta's arrays)."""
    return sum(
        len(array.data) for record in reply.content.array_records.values() for array in record.values()
    )
