"""Sealed uploads through the real round loop: what a device sends, and each upload that is refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.clientapp import ClientApp

from fleetlora.client.client_app import build_client_app
from fleetlora.client.device_state import DeviceState
from fleetlora.client.enroll import ensure_device_key
from fleetlora.client.local_data import local_examples
from fleetlora.common import records
from fleetlora.common.envelope import SEALED
from fleetlora.common.errors import FleetloraError
from fleetlora.coordinator.keys import init_keys
from fleetlora.coordinator.rounds import Federation
from fleetlora.coordinator.settings import CoordinatorSettings
from fleetlora.coordinator.storage import Storage
from tests.coordinator.local_grid import LocalGrid
from tests.coordinator.test_rounds import _run_config


def _sealed_fleet(tmp_path: Path, sqlite_url: str, enrolled: int = 3, rounds: int = 1) -> dict:
    """Coordinator keys, 3 devices with signing keys, ``enrolled`` of them registered; the run config."""
    config = _run_config(
        sqlite_url,
        **{
            "seal-uploads": True,
            "keys": str(tmp_path / "keys"),
            "device-state": str(tmp_path / "devices"),
            "rounds": rounds,
            "min-devices": 1,
        },
    )
    init_keys(tmp_path / "keys")
    devices = Storage.open(sqlite_url).devices
    for partition in range(3):
        key = ensure_device_key(DeviceState.locate({"partition-id": partition}, config))
        if partition < enrolled:
            devices.enroll(f"partition-{partition}", "default", key)
    return config


def _run(config: dict, app: ClientApp | None = None) -> tuple[list, LocalGrid]:
    grid = LocalGrid(app or build_client_app(), 3, config)
    return Federation(grid, CoordinatorSettings.from_run_config(config)).run(), grid


def _tampering_app(tamper) -> ClientApp:
    """The real ClientApp, whose train replies pass through ``tamper(reply, context)`` on the way out."""
    real, app = build_client_app(), ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        return tamper(real(message, context), context)

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        return real(message, context)

    return app


def test_a_sealed_fleet_trains_and_nothing_readable_leaves_a_device(tmp_path: Path, sqlite_url: str):
    config = _sealed_fleet(tmp_path, sqlite_url)
    grid = LocalGrid(build_client_app(), 3, config)
    sent: list[Message] = []
    original_pull = grid.pull_messages
    grid.pull_messages = lambda ids: sent.extend(r := list(original_pull(ids))) or r  # type: ignore[method-assign]

    (outcome,) = Federation(grid, CoordinatorSettings.from_run_config(config)).run()

    assert outcome.version is not None and len(outcome.participants) == 3 and not outcome.drops
    texts = [
        e.text.encode()
        for p in range(3)
        for e in local_examples({"partition-id": p, "num-partitions": 3}, config)
    ]
    kinds = Counter(m.metadata.message_type for m in sent)
    # Sealed train replies, evaluation replies, and the update distribution's two exchanges.
    assert kinds == {
        MessageType.TRAIN: 3,
        MessageType.EVALUATE: 3,
        records.QUERY_UPDATE_STATUS: 3,
        records.QUERY_UPDATE_APPLY: 3,
    }
    assert outcome.distribution is not None and outcome.distribution.statuses == {"applied": 3}
    for reply in sent:
        assert records.ARRAYS not in reply.content.array_records  # no plain adapter values, ever
        blobs = [
            a.numpy().tobytes() for record in reply.content.array_records.values() for a in record.values()
        ]
        blobs += [
            v if isinstance(v, bytes) else str(v).encode()
            for c in reply.content.config_records.values()
            for v in c.values()
        ]
        everything = b"|".join(blobs)
        assert not any(text in everything for text in texts)  # no training text in any record
        assert b'"dtype":"F32"' not in everything  # no plain safetensors either


def _flip(reply: Message, _context) -> Message:
    chunk = reply.content.array_records[SEALED]["chunk-000000"].numpy().copy()
    chunk[100] ^= 1
    reply.content.array_records[SEALED] = ArrayRecord(array_dict={"chunk-000000": Array(chunk)})
    return reply


def _truncate(reply: Message, _context) -> Message:
    chunk = reply.content.array_records[SEALED]["chunk-000000"].numpy()[:-10].copy()
    reply.content.array_records[SEALED] = ArrayRecord(array_dict={"chunk-000000": Array(chunk)})
    return reply


def _other_model(reply: Message, _context) -> Message:
    reply.content.config_records[records.CONFIG]["upload.base_sha256"] = "0" * 64
    return reply


def _only(partition: int, tamper):
    def apply(reply: Message, context) -> Message:
        return tamper(reply, context) if context.node_config["partition-id"] == partition else reply

    return apply


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_flip, "signature does not match"),
        (_truncate, "signature does not match"),
        (_other_model, "base model 000000000000, not ours"),
    ],
    ids=["bit-flipped", "truncated", "wrong-model"],
)
def test_a_tampered_upload_is_refused_with_its_reason_and_the_round_goes_on(
    tmp_path: Path, sqlite_url: str, tamper, reason: str
):
    config = _sealed_fleet(tmp_path, sqlite_url)
    (outcome,), _ = _run(config, _tampering_app(_only(1, tamper)))
    assert outcome.version is not None and len(outcome.participants) == 2
    (drop,) = outcome.drops
    assert drop.reason.startswith("sealed upload refused: ") and reason in drop.reason


def test_an_unknown_device_is_refused(tmp_path: Path, sqlite_url: str):
    config = _sealed_fleet(tmp_path, sqlite_url, enrolled=2)
    (outcome,), _ = _run(config)
    assert [d.reason for d in outcome.drops] == [
        "sealed upload refused: unknown device 'partition-2': enroll it first"
    ]


def test_a_device_signing_with_another_key_is_refused(tmp_path: Path, sqlite_url: str):
    config = _sealed_fleet(tmp_path, sqlite_url)
    devices = Storage.open(sqlite_url).devices
    devices.enroll("partition-0", "default", ensure_device_key(DeviceState(tmp_path / "impostor")))
    (outcome,), _ = _run(config)
    assert [d.reason for d in outcome.drops] == [
        "sealed upload refused: signature does not match (ciphertext truncated or altered, or wrong key)"
    ]


def test_a_replayed_upload_from_an_earlier_round_is_refused(tmp_path: Path, sqlite_url: str):
    config = _sealed_fleet(tmp_path, sqlite_url, rounds=2)
    first_round: dict[int, Message] = {}

    def replay(reply: Message, context) -> Message:
        partition = context.node_config["partition-id"]
        if partition not in first_round:
            first_round[partition] = reply
            return reply
        reply.content = first_round[partition].content  # round 1's sealed upload, sent again
        return reply

    (_, second), _ = _run(config, _tampering_app(_only(0, replay)))
    assert second.version is not None
    assert [d.reason for d in second.drops] == [
        "sealed upload refused: upload is for round 1, not 2 (replayed)"
    ]


def test_a_quantized_upload_codec_sends_less_and_still_trains(tmp_path: Path, sqlite_url: str):
    lossless = _sealed_fleet(tmp_path / "fp32", f"sqlite:///{tmp_path / 'fp32.db'}")
    int8 = {
        **_sealed_fleet(tmp_path / "int8", f"sqlite:///{tmp_path / 'int8.db'}"),
        "upload-codec": "int8+zstd",
    }

    (exact,), _ = _run(lossless)
    (quantized,), _ = _run(int8)

    assert quantized.version is not None and len(quantized.participants) == 3 and not quantized.drops
    assert quantized.upload_bytes < exact.upload_bytes / 2  # int8 against fp32, both zstd-compressed


def test_an_unknown_upload_codec_is_a_clear_error(tmp_path: Path, sqlite_url: str):
    config = {**_sealed_fleet(tmp_path, sqlite_url), "upload-codec": "bf16+lz4"}
    with pytest.raises(FleetloraError, match="Unknown codec"):
        CoordinatorSettings.from_run_config(config)


def test_an_upload_must_come_from_the_node_its_device_was_enrolled_with(tmp_path: Path, sqlite_url: str):
    config = _sealed_fleet(tmp_path, sqlite_url)
    devices = Storage.open(sqlite_url).devices
    # LocalGrid's node ids are 101, 102, 103 for partitions 0, 1, 2.
    for partition, node in ((0, 102), (1, 102)):  # partition-0 enrolled under partition-1's node
        key = ensure_device_key(DeviceState.locate({"partition-id": partition}, config))
        devices.enroll(f"partition-{partition}", "default", key, node_id=node)
    (outcome,), _ = _run(config)
    assert sorted(outcome.participants) == [102, 103]
    assert [d.reason for d in outcome.drops] == [
        "sealed upload refused: device 'partition-0' is enrolled as node 102, "
        "but this reply came from node 101"
    ]
