from flwr.app import ConfigRecord

from fleetlora.client.client_app import report_active
from fleetlora.client.updates import ActiveAdapter
from fleetlora.common import records


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
