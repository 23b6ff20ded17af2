"""Every check of a train reply, one hostile reply each, against the aggregator alone (no round, no SQL)."""

from __future__ import annotations

import json
from uuid import uuid4

import pytest
import torch
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fleetlora.common import records
from fleetlora.common.codec import Codec, encode, inflated_bound
from fleetlora.common.config import ModelSpec, TrainSettings
from fleetlora.common.delta import State, to_array_record
from fleetlora.common.envelope import SEALED, UploadContext, seal, to_records
from fleetlora.common.messages import Instructions
from fleetlora.coordinator.aggregation import DeltaAggregator, ExampleWeightedMean
from fleetlora.coordinator.central_dp import (
    CENTRAL_DP_CLIPPED,
    CentralDPAccountant,
    CentralDPMean,
    CentralDPRound,
    CentralDPSettings,
)
from fleetlora.coordinator.influence import RoundBounds
from fleetlora.coordinator.storage import Decline, DeviceKey
from fleetlora.coordinator.uploads import SealedUploads, open_plain

GLOBAL: State = {"w": torch.zeros(4), "b": torch.zeros(2)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Flower's ServerApp runtime sets these before any Message is built.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _delta(value: float) -> State:
    return {"w": torch.full((4,), value), "b": torch.full((2,), value)}


def _reply(node: int, content: RecordDict | Error) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = str(uuid4())
    return Message(content, reply_to=sent)


def _train_reply(node: int, delta: State | None = None, examples=4, **metrics) -> Message:
    content = RecordDict({records.CONFIG: ConfigRecord({records.DEVICE_ID: f"device-{node}"})})
    content[records.METRICS] = MetricRecord({records.NUM_EXAMPLES: examples, "train_loss": 1.0, **metrics})
    if delta is not None:
        content[records.ARRAYS] = to_array_record(delta)
    return _reply(node, content)


def _plain() -> DeltaAggregator:
    return DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), open_plain)


def _reasons(aggregator: DeltaAggregator) -> list[str]:
    return [d.reason for d in aggregator.drops]


def test_good_replies_fold_into_the_example_weighted_mean():
    aggregator = _plain()

    aggregator.add(_train_reply(1, _delta(1.0), examples=1, train_loss=2.0))
    aggregator.add(_train_reply(2, _delta(4.0), examples=3, train_loss=6.0))
    update = aggregator.release(sampled=2, online=2)

    assert torch.equal(update.delta["w"], torch.full((4,), (1 * 1.0 + 3 * 4.0) / 4))
    assert update.metrics == {"train_loss": (1 * 2.0 + 3 * 6.0) / 4}
    assert aggregator.participants == {1: 1, 2: 3} and not aggregator.drops


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (lambda: _reply(1, Error(code=0, reason="disk full")), "device error: disk full"),
        (
            lambda: _reply(1, RecordDict({records.CONFIG: ConfigRecord({records.DECLINED: "budget"})})),
            "declined: budget",
        ),
        (lambda: _reply(1, RecordDict({records.ARRAYS: to_array_record(GLOBAL)})), "reply has no metrics"),
        (lambda: _train_reply(1, _delta(1.0), examples=0), "invalid num-examples: 0"),
        (lambda: _train_reply(1, _delta(1.0), examples=2.5), "invalid num-examples: 2.5"),
        (
            lambda: _train_reply(1, _delta(1.0), train_loss=[1.0, 2.0]),
            "metric 'train_loss' is a list, not a number",
        ),
        (
            lambda: _train_reply(1, _delta(1.0), train_loss=float("nan")),
            "metric 'train_loss' is nan, not a finite",
        ),
        (
            lambda: _train_reply(1, _delta(1.0), dp_epsilon=float("inf")),
            "metric 'dp_epsilon' is inf, not a finite",
        ),
        (
            lambda: _train_reply(1, _delta(1.0), central_dp_epsilon=0.01),
            "metric 'central_dp_epsilon' is not a device metric",
        ),
        (
            lambda: _train_reply(1, _delta(1.0), **{"\x1b[2J": 1.0}),
            "metric '\\x1b[2J' is not a device metric",
        ),
        (
            lambda: _train_reply(1, _delta(1.0), **{f"train_{i}": 1.0 for i in range(40)}),
            "41 metrics, at most 32",
        ),
        (lambda: _train_reply(1, None), "reply has no arrays"),
        (lambda: _train_reply(1, {"w": torch.zeros(4)}), "layout mismatch: "),
        (lambda: _train_reply(1, {**_delta(1.0), "w": torch.zeros(5)}), "layout mismatch: "),
        (lambda: _train_reply(1, _delta(float("nan"))), "delta holds NaN or inf"),
    ],
    ids=[
        "error",
        "declined",
        "no-metrics",
        "zero-count",
        "float-count",
        "list-metric",
        "nan-metric",
        "inf-dp-epsilon",
        "coordinator-key",
        "escape-sequence-key",
        "too-many-metrics",
        "no-arrays",
        "missing-tensor",
        "wrong-shape",
        "nan",
    ],
)
def test_a_hostile_reply_is_dropped_with_its_reason_and_nothing_of_it_is_folded(reply, reason: str):
    aggregator = _plain()
    aggregator.add(_train_reply(2, _delta(1.0)))

    aggregator.add(reply())

    (drop,) = aggregator.drops
    assert drop.node_id == 1 and drop.reason.startswith(reason)
    assert aggregator.participants == {2: 4}
    assert torch.equal(aggregator.release(sampled=2, online=2).delta["w"], torch.ones(4))


def test_a_decline_is_kept_with_its_node_the_device_it_names_and_its_reason():
    aggregator = _plain()
    declines = {
        1: {records.DEVICE_ID: "phone-1", records.DECLINED: "on battery (34%)"},
        2: {records.DECLINED: "too hot"},  # names no device
        3: {records.DEVICE_ID: "x" * 500, records.DECLINED: "a name too long to be one"},
    }
    for node, config in declines.items():
        aggregator.add(_reply(node, RecordDict({records.CONFIG: ConfigRecord(config)})))
    aggregator.add(_train_reply(4, _delta(1.0)))

    assert aggregator.declines == [
        Decline(1, "phone-1", "on battery (34%)"),
        Decline(2, None, "too hot"),
        Decline(3, None, "a name too long to be one"),
    ]
    assert _reasons(aggregator) == [
        "declined: on battery (34%)",
        "declined: too hot",
        "declined: a name too long to be one",
    ]
    assert aggregator.participants == {4: 4}


def test_a_second_reply_from_the_same_node_is_dropped():
    aggregator = _plain()
    aggregator.add(_train_reply(1, _delta(1.0)))
    aggregator.add(_train_reply(1, _delta(9.0)))
    assert _reasons(aggregator) == ["duplicate reply"] and aggregator.participants == {1: 4}


def test_a_privacy_spend_is_kept_even_when_the_delta_is_refused():
    aggregator = _plain()
    aggregator.add(_train_reply(1, _delta(float("inf")), dp_epsilon=2.0, dp_delta=1e-5, train_steps=5))
    assert _reasons(aggregator) == ["delta holds NaN or inf"]
    (spend,) = aggregator.privacy
    assert (spend.device_id, spend.epsilon, spend.delta, spend.steps) == ("device-1", 2.0, 1e-5, 5)


def test_central_dp_wraps_the_mean_clips_weighs_devices_equally_and_accounts():
    settings = CentralDPSettings(noise_multiplier=1e-9, clip_norm=1.0)
    earlier = CentralDPRound(noise_multiplier=1e-9, sample_rate=1.0, epsilon=0.0, clipped=0)
    accountant = CentralDPAccountant(settings, [earlier])
    aggregator = DeltaAggregator(GLOBAL, CentralDPMean(ExampleWeightedMean(GLOBAL), accountant), open_plain)

    aggregator.add(_train_reply(1, _delta(0.1), examples=1))  # norm 0.24: kept as it is
    aggregator.add(_train_reply(2, _delta(10.0), examples=100))  # norm 24.5: clipped to 1
    update = aggregator.release(sampled=4, online=8)

    clipped = 10.0 / (10.0 * 6**0.5)
    # Equal weights, the sum divided by the 4 sampled devices, not by 2 contributors or 101 examples.
    torch.testing.assert_close(update.delta["w"], torch.full((4,), (0.1 + clipped) / 4))
    assert update.metrics[CENTRAL_DP_CLIPPED] == 1.0
    assert CentralDPRound.from_metrics(update.metrics) == accountant.history[-1]
    assert [r.sample_rate for r in accountant.history] == [1.0, 0.5]


# ---- sealed uploads ----------------------------------------------------------------------


class _Fleet:
    """A coordinator key, two enrolled devices (node 1 and an unbound one) and a round's instructions."""

    def __init__(self) -> None:
        self.coordinator = X25519PrivateKey.generate()
        self.devices = {"device-1": Ed25519PrivateKey.generate(), "device-2": Ed25519PrivateKey.generate()}
        self.nodes = {"device-1": "1", "device-2": None}
        self.instructions = Instructions(
            spec=ModelSpec("tiny", "causal-lm"),
            train=TrainSettings(),
            round=3,
            version=7,
            base_sha256="ab" * 32,
            seal_uploads=True,
        )

    def enrolled(self, device_id: str):
        key = self.devices.get(device_id)
        return DeviceKey(key.public_key(), self.nodes[device_id]) if key else None

    def opener(self) -> SealedUploads:
        return SealedUploads(self.instructions, self.coordinator, self.enrolled, inflated_bound(GLOBAL))

    def reply(self, node: int, device_id: str, plaintext: bytes, *, round_: int = 3, signer=None) -> Message:
        claimed = UploadContext("default", device_id, round_, "ab" * 32, 7)
        signer = signer or self.devices.get(device_id) or Ed25519PrivateKey.generate()
        arrays, claim = to_records(seal(plaintext, claimed, self.coordinator.public_key(), signer), claimed)
        config = ConfigRecord({records.DEVICE_ID: device_id, **claim})
        metrics = MetricRecord({records.NUM_EXAMPLES: 2})
        return _reply(node, RecordDict({SEALED: arrays, records.CONFIG: config, records.METRICS: metrics}))


def _encoded(delta: State) -> bytes:
    return encode(delta, Codec("fp32"), level=3)


def test_a_sealed_upload_opens_decodes_and_folds():
    fleet = _Fleet()
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), fleet.opener())
    aggregator.add(fleet.reply(1, "device-1", _encoded(_delta(2.0))))
    assert not aggregator.drops and aggregator.participants == {1: 2}
    assert torch.equal(aggregator.release(sampled=1, online=1).delta["b"], torch.full((2,), 2.0))


def _bomb() -> bytes:
    """A few KiB of zstd that declares 64 MiB of zeros, far past the bound of a 6-value adapter."""
    return zstandard.ZstdCompressor().compress(bytes(64 << 20))


def _empty_array_of_2_63_rows() -> bytes:
    """fp32 safetensors: one array of no values, a dimension past int64 (torch raises a TypeError)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}).encode()
    return zstandard.compress(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    ("node", "device", "plaintext", "kwargs", "reason"),
    [
        (9, "device-9", b"", {}, "unknown device 'device-9': enroll it first"),
        (2, "device-1", b"", {}, "device 'device-1' is enrolled as node 1, but this reply came from node 2"),
        (2, "device-2", b"", {"round_": 2}, "upload is for round 2, not 3 (replayed)"),
        (2, "device-2", b"", {"signer": Ed25519PrivateKey.generate()}, "signature does not match"),
        (2, "device-2", b"not zstd", {}, "decrypted upload is not a delta (payload refused: not zstd data"),
        (
            2,
            "device-2",
            _bomb(),
            {},
            "decrypted upload is not a delta (payload refused: zstd data would inflate to 67108864",
        ),
        (2, "device-2", zstandard.compress(b"not safetensors"), {}, "decrypted upload is not a delta"),
        (2, "device-2", _empty_array_of_2_63_rows(), {}, "decrypted upload is not a delta"),
    ],
    ids=[
        "unknown-device",
        "wrong-node",
        "replayed",
        "wrong-key",
        "not-zstd",
        "bomb",
        "not-safetensors",
        "dimension-past-int64",
    ],
)
def test_a_hostile_sealed_upload_is_refused_with_its_reason(node, device, plaintext, kwargs, reason: str):
    fleet = _Fleet()
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), fleet.opener())

    aggregator.add(fleet.reply(node, device, plaintext, **kwargs))

    (drop,) = aggregator.drops
    assert drop.reason.startswith("sealed upload refused: ") and reason in drop.reason
    assert not aggregator.participants


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 31_337, 65_535])
def test_a_sealed_delta_with_one_nan_or_inf_value_is_dropped_as_such_and_flagged(bad: float, position: int):
    # Finiteness is read off the delta's L2 norm (a NaN or inf value makes it NaN or inf), then the values
    # are scanned for the reason: arrays large enough for torch's vectorized reductions, fp32-decoded.
    reference = {"a": torch.zeros(256, 256), "b": torch.zeros(77)}
    fleet = _Fleet()
    opener = SealedUploads(fleet.instructions, fleet.coordinator, fleet.enrolled, inflated_bound(reference))
    aggregator = DeltaAggregator(reference, ExampleWeightedMean(reference), opener)
    honest = {"a": torch.full((256, 256), 1e-3), "b": torch.full((77,), 1e-3)}
    hostile = {"a": honest["a"].clone(), "b": honest["b"]}
    hostile["a"].view(-1)[position] = bad

    aggregator.add(fleet.reply(1, "device-1", _encoded(honest)))
    aggregator.add(fleet.reply(2, "device-2", _encoded(hostile)))

    assert _reasons(aggregator) == ["delta holds NaN or inf"]
    assert aggregator.anomalies == [("device-2", "delta holds NaN or inf")]
    assert aggregator.participants == {1: 2} and 2 not in aggregator.norms
    assert torch.equal(aggregator.release(sampled=2, online=2).delta["a"], honest["a"])


def test_finite_values_whose_float64_norm_overflows_fail_the_norm_bound_not_the_finite_check():
    # Only float64 values can overflow a float64 sum of squares: the reason is still the bound's.
    reference = {"w": torch.zeros(4, dtype=torch.float64)}
    bounds = RoundBounds(absolute=10.0, absolute_why="a test's bound")
    aggregator = DeltaAggregator(reference, ExampleWeightedMean(reference), open_plain, bounds)

    aggregator.add(_train_reply(1, {"w": torch.full((4,), 1e200, dtype=torch.float64)}))

    (reason,) = _reasons(aggregator)
    assert reason.startswith("delta norm inf above the round's bound 10") and not aggregator.participants


@pytest.mark.parametrize(
    "chunk",
    [b"", b"PK\x03\x04" + bytes(60), b"\x93NUMPY\x01\x00\x40\x00{'descr': '<f8', 'shape': (10**30,)"],
    ids=["empty", "zip-magic", "cut-header"],
)
def test_a_sealed_upload_whose_chunk_np_load_cannot_read_is_dropped_not_raised(chunk: bytes):
    # The chunks are joined before the signature is checked: any node may send these.
    fleet = _Fleet()
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), fleet.opener())
    reply = fleet.reply(2, "device-2", _encoded(_delta(1.0)))
    reply.content.array_records[SEALED]["chunk-000000"] = Array(
        dtype="uint8", shape=(len(chunk),), stype="numpy.ndarray", data=chunk
    )

    aggregator.add(reply)

    (reason,) = _reasons(aggregator)
    assert reason.startswith("sealed upload refused: malformed sealed upload (chunk is not a .npy array")
    assert not aggregator.participants


def test_a_plain_reply_is_refused_when_uploads_are_sealed():
    fleet = _Fleet()
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), fleet.opener())
    aggregator.add(_train_reply(1, _delta(1.0)))
    assert _reasons(aggregator) == ["sealed upload refused: reply holds no sealed upload"]


def test_a_refused_upload_cannot_write_its_spend_into_another_devices_ledger_row():
    fleet = _Fleet()
    aggregator = DeltaAggregator(GLOBAL, ExampleWeightedMean(GLOBAL), fleet.opener())
    forged = fleet.reply(2, "device-1", _encoded(_delta(1.0)), signer=Ed25519PrivateKey.generate())
    forged.content[records.METRICS]["dp_epsilon"] = 7.5  # claims device-1 spent 7.5

    aggregator.add(forged)

    assert not aggregator.participants and "sealed upload refused" in _reasons(aggregator)[0]
    assert [(s.device_id, s.epsilon) for s in aggregator.privacy] == [("node-2", 7.5)]
