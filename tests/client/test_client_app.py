import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fleetlora.client.client_app import build_client_app, report_active
from fleetlora.client.updates import ActiveAdapter
from fleetlora.common import records
from tests.coordinator.local_grid import LocalGrid


def _active(version: int, sequence: int) -> ActiveAdapter:
    return ActiveAdapter(
        generation=1,
        slot="slot-a",
        version=version,
        sequence=sequence,
        adapter_sha256="a" * 64,
        base_sha256="b" * 64,
        tenant="default",
        lineage="L",
        model={},
        codec="fp32+zstd",
        reconstruction_error=0.0,
        applied_at="2026-03-01T12:00:00+00:00",
    )


def test_a_device_without_a_packaged_adapter_sends_no_version():
    reply = ConfigRecord({records.DEVICE_ID: "device-1"})
    report_active(reply, None)
    assert records.ACTIVE_VERSION not in reply
    assert reply[records.ACTIVE_SEQUENCE] == 0


def test_a_device_with_a_packaged_adapter_sends_its_version_and_sequence():
    reply = ConfigRecord({records.DEVICE_ID: "device-1"})
    report_active(reply, _active(version=7, sequence=7))
    assert (reply[records.ACTIVE_VERSION], reply[records.ACTIVE_SEQUENCE]) == (7, 7)


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ({"partition-id": 3, "num-partitions": 4}, "partition-3"),  # a simulated device
        ({"device-id": "kiosk-7", "data-path": "x.csv"}, "kiosk-7"),  # a real one, consent or not
    ],
)
def test_a_device_says_who_it_is_and_nothing_else(node_config: dict, named: str):
    grid = LocalGrid(build_client_app(), 1, run_config={}, node_configs=[node_config])
    query = Message(RecordDict(), dst_node_id=grid.node_ids[0], message_type=records.QUERY_IDENTITY)

    (reply,) = grid.send_and_receive([query])

    assert not reply.has_error()
    assert dict(reply.content[records.CONFIG]) == {records.DEVICE_ID: named}
