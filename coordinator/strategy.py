"""Turning device replies into a global update: validate each reply, fold the good ones in.

A reply is dropped, with its reason kept for the round record, when the device reported an error,
the reply lacks its arrays or metrics, the example count is not a positive integer, the delta's
layout differs from the global adapter's, or it holds NaN/inf. The rest are averaged weighted by
their example counts (:class:`~fleetlora.common.aggregate.WeightedMean`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message

from fleetlora.common import records
from fleetlora.common.aggregate import WeightedMean
from fleetlora.common.delta import State, from_array_record, is_finite
from fleetlora.common.envelope import EnvelopeError
from fleetlora.common.errors import IncompatibleStateError
from fleetlora.coordinator.central_dp import clip


@dataclass(frozen=True)
class Drop:
    """A device left out of a round, and why."""

    node_id: int
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"node_id": str(self.node_id), "reason": self.reason}


@dataclass
class _Tally:
    """Weighted sums of scalar metrics, for a weighted mean over the accepted replies."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, metrics: Mapping[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + weight * float(value)
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {key: total / self.weight for key, total in self.sums.items()} if self.weight else {}


def _metrics_and_count(message: Message) -> tuple[dict[str, float], int] | str:
    """The reply's metrics and example count, or the reason they are unusable."""
    if message.has_error():
        return f"device error: {message.error.reason}"
    metric_records = message.content.metric_records
    if records.METRICS not in metric_records:
        return "reply has no metrics"
    metrics = dict(metric_records[records.METRICS])  # a copy: callers may take keys out
    count = metrics.pop(records.NUM_EXAMPLES, None)
    if not isinstance(count, int) or count <= 0:
        return f"invalid {records.NUM_EXAMPLES}: {count!r}"
    return metrics, count


@dataclass(frozen=True)
class PrivacySpend:
    """A DP device's cumulative spend as it reported it after a round (a privacy-ledger entry)."""

    device_id: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int


_DP_KEYS = (records.DP_EPSILON, records.DP_DELTA, records.DP_NOISE_MULTIPLIER, records.DP_SAMPLE_RATE)


def _device_config(message: Message) -> Mapping[str, object]:
    configs = message.content.config_records if not message.has_error() else {}
    return configs.get(records.CONFIG, {})


def _privacy_spend(message: Message, metrics: dict[str, float]) -> PrivacySpend | None:
    """Take the dp_* metrics out of ``metrics`` (they are per device, not averaged) into a ledger entry."""
    values = {key: metrics.pop(key) for key in _DP_KEYS if key in metrics}
    if records.DP_EPSILON not in values:
        return None
    device = str(_device_config(message).get(records.DEVICE_ID, f"node-{message.metadata.src_node_id}"))
    return PrivacySpend(
        device_id=device,
        epsilon=float(values[records.DP_EPSILON]),
        delta=float(values.get(records.DP_DELTA, 0.0)),
        noise_multiplier=float(values.get(records.DP_NOISE_MULTIPLIER, 0.0)),
        sample_rate=float(values.get(records.DP_SAMPLE_RATE, 0.0)),
        steps=int(metrics.get(records.TRAIN_STEPS, 0)),
    )


def _timeouts(sampled: Iterable[int], answered: set[int], drops: list[Drop], reason: str) -> list[Drop]:
    """Drops for the sampled devices that neither answered nor were already dropped."""
    seen = answered | {d.node_id for d in drops}
    return [Drop(n, reason) for n in sampled if n not in seen]


class DeltaAggregator:
    """Streams train replies into a weighted mean delta."""

    def __init__(
        self,
        global_state: State,
        unseal: Callable[[Message], State] | None = None,
        clip_norm: float | None = None,
    ) -> None:
        self._unseal = unseal  # set when uploads are sealed: opens one, or raises EnvelopeError
        self._clip_norm = clip_norm  # central DP: clip each delta and weigh devices equally
        self.clipped = 0
        self._mean = WeightedMean(global_state)
        self._tally = _Tally()
        self.participants: dict[int, int] = {}
        self.drops: list[Drop] = []
        self.upload_bytes = 0
        self.privacy: list[PrivacySpend] = []

    def add(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if node in self.participants:
            self.drops.append(Drop(node, "duplicate reply"))
            return
        declined = _device_config(reply).get(records.DECLINED)
        if declined:
            self.drops.append(Drop(node, f"declined: {declined}"))
            return
        checked = _metrics_and_count(reply)
        if isinstance(checked, str):
            self.drops.append(Drop(node, checked))
            return
        metrics, count = checked
        spend = _privacy_spend(reply, metrics)
        if spend:  # spent whether or not the delta is usable, so recorded first
            self.privacy.append(spend)
        if self._unseal is not None:
            try:
                delta = self._unseal(reply)
            except EnvelopeError as exc:
                self.drops.append(Drop(node, f"sealed upload refused: {exc}"))
                return
        elif records.ARRAYS in reply.content.array_records:
            delta = from_array_record(reply.content.array_records[records.ARRAYS])
        else:
            self.drops.append(Drop(node, "reply has no arrays"))
            return
        if not is_finite(delta):
            self.drops.append(Drop(node, "delta holds NaN or inf"))
            return
        weight, was_clipped = count, False
        if self._clip_norm is not None:
            delta, was_clipped = clip(delta, self._clip_norm)
            weight = 1
        try:
            self._mean.add(delta, weight=weight)
        except IncompatibleStateError as exc:
            self.drops.append(Drop(node, f"layout mismatch: {exc}"))
            return
        self.clipped += was_clipped
        self.participants[node] = count
        self.upload_bytes += wire_bytes(reply)
        self._tally.add(metrics, count)

    def mark_missing(self, sampled: Iterable[int]) -> None:
        """Record every sampled device that neither contributed nor was dropped as timed out."""
        self.drops.extend(
            _timeouts(sampled, set(self.participants), self.drops, "no reply before the deadline")
        )

    def mean_delta(self) -> State:
        return self._mean.result()

    def metrics(self) -> dict[str, float]:
        """Example-weighted means of the devices' scalar metrics."""
        return self._tally.means()


class MetricAggregator:
    """Streams evaluate replies into example-weighted mean metrics, named ``prefix + key``."""

    def __init__(self, prefix: str = "") -> None:
        self._tally = _Tally()
        self._prefix = prefix
        self.evaluated: set[int] = set()
        self.drops: list[Drop] = []
        self.examples = 0

    def add(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        checked = _metrics_and_count(reply)
        if isinstance(checked, str):
            self.drops.append(Drop(node, f"evaluation: {checked}"))
            return
        metrics, count = checked
        self._tally.add(metrics, count)
        self.evaluated.add(node)
        self.examples += count

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
