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


def _one_example_device(tmp_path, held_out: bool) -> dict:
    """A real device holding one example, which split_holdout puts on the held-out side or not."""
    from fleetlora.common.data import Example, split_holdout

    text = next(
        t
        for t in (f"card number {i} was charged twice" for i in range(1000))
        if bool(split_holdout([Example(text=t, label="a")])[1]) is held_out
    )
    data = tmp_path / f"held-out-{held_out}.csv"
    data.write_text(f"text,label\n{text},card_payment_fee_charged\n")
    return {"device-id": f"few-{held_out}", "data-path": str(data), "upload-consent": True}


@pytest.mark.parametrize(
    ("held_out", "kind", "said"),
    [
        (True, "train", "no local training examples"),
        (False, "evaluate", "no held-out examples to evaluate on"),
    ],
)
def test_a_device_of_one_example_declines_what_it_cannot_do_rather_than_fail(
    tmp_path, tiny_spec, held_out: bool, kind: str, said: str
):
    from fleetlora.common.config import TrainSettings
    from tests.client.test_pacing import train_message

    grid = LocalGrid(
        build_client_app(), 1, run_config={}, node_configs=[_one_example_device(tmp_path, held_out)]
    )
    message = train_message(tiny_spec, TrainSettings(local_steps=2, batch_size=8), grid.node_ids[0])
    message.metadata.__dict__["_message_type"] = kind

    (reply,) = grid.send_and_receive([message])

    assert not reply.has_error()
    assert reply.content[records.CONFIG][records.DECLINED] == said
    assert reply.content[records.CONFIG][records.DEVICE_ID] == f"few-{held_out}"
