"""results.json's rounds: the partitions each round sampled."""

from __future__ import annotations

from fleetlora.coordinator.rounds import RoundOutcome
from fleetlora.simulations.results import summarize


def test_a_round_lists_its_sampled_partitions_in_the_order_drawn():
    outcome = RoundOutcome(
        round=2,
        version=None,
        sampled_devices=["partition-10", "partition-2", "kiosk-7"],
        participants={},
        drops=[],
        upload_bytes=0,
        seconds=1.0,
        error="quorum",
    )

    summary = summarize(outcome)

    assert summary["partitions"] == [10, 2, "kiosk-7"]  # a device that is no partition by its id
