"""A device's status answer is read field by field: a malformed one is counted, never trusted or fatal."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fleetlora.common import records
from fleetlora.coordinator.distribution import Holding


def test_a_well_formed_answer_is_read_and_an_absent_version_means_none():
    held = Holding.read(
        ConfigRecord({records.DEVICE_ID: "d1", records.ACTIVE_VERSION: 4, records.ACTIVE_SEQUENCE: 4})
    )
    fresh = Holding.read(ConfigRecord({records.DEVICE_ID: "d2", records.ACTIVE_SEQUENCE: 0}))

    assert held == Holding("d1", 4, 4)
    assert fresh == Holding("d2", None, 0)


@pytest.mark.parametrize(
    "answer",
    [
        {},  # no device id
        {records.DEVICE_ID: ""},
        {records.DEVICE_ID: "x" * 129},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: "7"},  # a string where a version goes
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: 1.5},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: -1},  # the old "none" sentinel
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: True},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: 3, records.ACTIVE_SEQUENCE: -2},
        {records.DEVICE_ID: "d", records.ACTIVE_VERSION: [3, 4]},
    ],
)
def test_a_malformed_answer_is_refused(answer):
    assert Holding.read(ConfigRecord(answer)) is None
