"""One device reply, read without trusting it: its metrics, its privacy spend, its delta.

Each function checks one thing and raises a :class:`RejectedReply` subclass (one per failure, so
callers and tests branch on the type) whose message is the reason the round records for the device.
:class:`~fleetlora.coordinator.aggregation.DeltaAggregator` calls them in the order its docstring
states. Nothing here runs SQL or touches the network: a sealed upload's enrolled device key comes in
through a callable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Message

from fleetlora.common import records
from fleetlora.common.codec import Codec, CodecError, decode
from fleetlora.common.delta import State, check_layout, from_array_record, is_finite
from fleetlora.common.envelope import SEALED, EnvelopeError, UploadContext, from_records, open_sealed
from fleetlora.common.errors import FleetloraError, IncompatibleStateError
from fleetlora.common.messages import Instructions
from fleetlora.coordinator.identities import read_device_id, unnamed
from fleetlora.coordinator.storage.ledgers import PrivacySpend

# ---- failures: the message is the drop reason, word for word -------------------------------------


class RejectedReply(FleetloraError):
    """A reply left out of the round; ``str(exc)`` is the reason its drop records."""


class DuplicateReply(RejectedReply):
    """The node already contributed to this round."""


class DeclinedReply(RejectedReply):
    """The device chose not to train (a DP device past its budget, a gate closed) and said why."""

    def __init__(self, reason: str, device_id: str | None) -> None:
        super().__init__(f"declined: {reason}")
        self.reason = reason
        self.device_id = device_id  # the id the reply claims: a label, proving nothing


class DeviceFailed(RejectedReply):
    """Flower delivered an error reply: the device raised, or has no upload consent."""


class InvalidMetrics(RejectedReply):
    """No metrics, an example count that is not a positive integer, or a metric that is not a number."""


class UploadRefused(RejectedReply):
    """No delta in the reply, or a sealed upload that does not open and decode."""


class LayoutMismatch(RejectedReply):
    """The delta's names, shapes or dtypes differ from the global adapter's."""


class NonFiniteDelta(RejectedReply):
    """The delta holds NaN or inf, which would poison the mean."""


class Quarantined(RejectedReply):
    """The upload comes from a device in quarantine (coordinator/quarantine.py)."""


# ---- metrics and privacy spend -----------------------------------------------------------------


@dataclass(frozen=True)
class ReplyMetrics:
    """A reply's example count and its other scalar metrics (a copy: callers take keys out of it)."""

    examples: int
    values: dict[str, float]


def _reply_config(reply: Message) -> Mapping[str, object]:
    """The reply's ``config`` record (the device id, a decline, a sealed upload's claim); {} if none."""
    configs = reply.content.config_records if not reply.has_error() else {}
    return configs.get(records.CONFIG, {})


def check_not_declined(reply: Message) -> None:
    config = _reply_config(reply)
    declined = config.get(records.DECLINED)
    if declined:
        raise DeclinedReply(str(declined), read_device_id(config))


DEVICE_METRIC = re.compile(r"(train|dp|eval)_[a-z0-9_]{1,58}")  # what a device may report (client_app.py)
MAX_DEVICE_METRICS = 32


def read_metrics(reply: Message) -> ReplyMetrics:
    """The reply's metrics, once it is known to be an answer with a positive count and numbers only."""
    if reply.has_error():
        raise DeviceFailed(f"device error: {reply.error.reason}")
    metric_records = reply.content.metric_records
    if records.METRICS not in metric_records:
        raise InvalidMetrics("reply has no metrics")
    values = dict(metric_records[records.METRICS])
    count = values.pop(records.NUM_EXAMPLES, None)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise InvalidMetrics(f"invalid {records.NUM_EXAMPLES}: {count!r}")
    if len(values) > MAX_DEVICE_METRICS:
        raise InvalidMetrics(f"{len(values)} metrics, at most {MAX_DEVICE_METRICS}")
    numbers: dict[str, float] = {}
    for key, value in values.items():
        # The coordinator's own keys (central_*, weights_capped, ...) are never a device's to set.
        if not DEVICE_METRIC.fullmatch(key):
            raise InvalidMetrics(f"metric {key[:64]!r} is not a device metric (train_*, dp_* or eval_*)")
        # A MetricRecord may also hold lists; only scalars can be averaged.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidMetrics(f"metric {key!r} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):  # PostgreSQL refuses NaN in JSON, and a mean of it means nothing
            raise InvalidMetrics(f"metric {key!r} is {value}, not a finite number")
        numbers[key] = float(value)
    return ReplyMetrics(count, numbers)


_DP_KEYS = (
    records.DP_EPSILON,
    records.DP_DELTA,
    records.DP_NOISE_MULTIPLIER,
    records.DP_SAMPLE_RATE,
    records.DP_RECORDS_RETIRED,
)


def take_privacy_spend(reply: Message, metrics: ReplyMetrics) -> PrivacySpend | None:
    """Take the ``dp_*`` metrics (per device, never averaged) out of ``metrics`` as a ledger entry."""
    values = {key: metrics.values.pop(key) for key in _DP_KEYS if key in metrics.values}
    if records.DP_EPSILON not in values:
        return None
    # A malformed or overlong id is not written to the ledger as given: the node speaks for itself.
    device = read_device_id(_reply_config(reply)) or unnamed(reply.metadata.src_node_id)
    return PrivacySpend(
        device_id=device,
        epsilon=values[records.DP_EPSILON],
        delta=values.get(records.DP_DELTA, 0.0),
        noise_multiplier=values.get(records.DP_NOISE_MULTIPLIER, 0.0),
        sample_rate=values.get(records.DP_SAMPLE_RATE, 0.0),
        steps=int(metrics.values.get(records.TRAIN_STEPS, 0)),
        records_retired=int(values.get(records.DP_RECORDS_RETIRED, 0)),
    )


# ---- the delta: open (and decode), then layout and finiteness ---------------------------------


@dataclass(frozen=True)
class Upload:
    """An opened upload: its delta, and the device it is proven to come from (None: not proven)."""

    delta: State
    device_id: str | None = None


class UploadOpener(Protocol):
    """Takes a reply's delta out of it, or raises :class:`UploadRefused`."""

    def __call__(self, reply: Message) -> Upload: ...


def open_plain(reply: Message) -> Upload:
    """The delta of an unsealed reply: float arrays by name under ``arrays``; who sent it is not proven."""
    if records.ARRAYS not in reply.content.array_records:
        raise UploadRefused("reply has no arrays")
    return Upload(from_array_record(reply.content.array_records[records.ARRAYS]))


class EnrolledDevice(Protocol):
    """What enrolment recorded of a device: its upload-signing key and the node it must send from."""

    @property
    def public_key(self) -> Ed25519PublicKey: ...

    @property
    def node_id(self) -> str | None: ...  # None: enrolled without a node, any node may send


EnrolledKey = Callable[[str], EnrolledDevice | None]
"""A device id → what enrolment recorded of it; None if it is not enrolled in this coordinator's tenant."""


@dataclass(frozen=True)
class SealedUploads:
    """Opens one round's sealed uploads against the context this coordinator expects, then decodes them.

    Opening checks, in order: a ``sealed`` record and a well-formed claim; the claimed device is
    enrolled; the reply came from the node it was enrolled with (the SuperLink authenticated the
    sender); the claim equals the expected context (tenant, device, round, base model, from-version);
    the signature verifies against the enrolled key; the ciphertext decrypts. Decoding then refuses
    a payload that would inflate past ``max_bytes`` (a decompression bomb) or is not a delta.
    """

    instructions: Instructions  # the round's: tenant, round, base model, version trained from
    coordinator_key: X25519PrivateKey
    enrolled_key: EnrolledKey
    max_bytes: int  # common.codec.inflated_bound of the global adapter

    def __call__(self, reply: Message) -> Upload:
        try:
            plaintext, device_id = self._open(reply)
            return Upload(self._decode(plaintext), device_id)
        except EnvelopeError as exc:
            raise UploadRefused(f"sealed upload refused: {exc}") from None

    def _open(self, reply: Message) -> tuple[bytes, str]:
        """The plaintext, and the device id its signature proves."""
        arrays = reply.content.array_records.get(SEALED)
        if arrays is None:
            raise EnvelopeError("reply holds no sealed upload")
        sealed, claimed = from_records(arrays, reply.content.config_records.get(records.CONFIG, {}))
        enrolled = self.enrolled_key(claimed.device_id)
        if enrolled is None:
            raise EnvelopeError(f"unknown device {claimed.device_id!r}: enroll it first")
        public, node_id = enrolled.public_key, enrolled.node_id
        if node_id is not None and node_id != str(reply.metadata.src_node_id):
            raise EnvelopeError(
                f"device {claimed.device_id!r} is enrolled as node {node_id}, but this reply came from "
                f"node {reply.metadata.src_node_id}"
            )
        expected = UploadContext(
            tenant=self.instructions.tenant,
            device_id=claimed.device_id,  # proven by the signature against its enrolled key
            round=self.instructions.round,
            base_sha256=self.instructions.base_sha256,
            from_version=self.instructions.version,
        )
        plaintext = open_sealed(
            sealed,
            claimed=claimed,
            expected=expected,
            coordinator_key=self.coordinator_key,
            device_public=public,
        )
        return plaintext, claimed.device_id

    def _decode(self, plaintext: bytes) -> State:
        try:
            return decode(plaintext, Codec.parse(self.instructions.upload_codec), max_bytes=self.max_bytes)
        except CodecError as exc:
            raise EnvelopeError(f"decrypted upload is not a delta ({exc})") from None


def check_layout_of(delta: State, reference: State) -> None:
    try:
        check_layout(delta, reference)
    except IncompatibleStateError as exc:
        raise LayoutMismatch(f"layout mismatch: {exc}") from None


def check_finite(delta: State) -> None:
    if not is_finite(delta):
        raise NonFiniteDelta("delta holds NaN or inf")
