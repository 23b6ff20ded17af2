"""results.json's rounds: the partitions each round sampled."""

from __future__ import annotations

import json

from fleetlora.coordinator.rounds import RoundOutcome
from fleetlora.simulations.results import summarize, with_earlier_rounds


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


def _results(lineage: str, initial_round: int, rounds: list[int], resumed: bool, devices=None) -> dict:
    return {
        "lineage": lineage,
        "initial": {"version": f"v{initial_round + 1}", "round": initial_round, "resumed": resumed},
        "rounds": [{"round": r, "version": f"v{r + 1}"} for r in rounds],
        "devices": devices or {},
    }


def test_a_resumed_run_keeps_the_rounds_an_earlier_run_wrote(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results("L", 0, [1, 2], False, {"partition-0": {"epsilon": 2.0}})))

    merged = with_earlier_rounds(path, _results("L", 2, [3], True, {"partition-1": {"epsilon": 1.0}}))

    assert [r["round"] for r in merged["rounds"]] == [1, 2, 3]
    assert merged["initial"]["round"] == 0  # the lineage's start, not this run's
    assert set(merged["devices"]) == {"partition-0", "partition-1"}


def test_a_failed_round_run_again_is_kept_once_and_other_files_are_left_out(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results("L", 0, [1, 2], False)))
    # Round 2 failed and is run again: this run starts after round 1, the last stored version.
    assert [r["round"] for r in with_earlier_rounds(path, _results("L", 1, [2], True))["rounds"]] == [1, 2]
    # Another lineage, a fresh lineage, or a damaged file: this run's rounds alone.
    assert [r["round"] for r in with_earlier_rounds(path, _results("M", 2, [3], True))["rounds"]] == [3]
    assert [r["round"] for r in with_earlier_rounds(path, _results("L", 0, [1], False))["rounds"]] == [1]
    path.write_text("{not json")
    assert [r["round"] for r in with_earlier_rounds(path, _results("L", 2, [3], True))["rounds"]] == [3]
