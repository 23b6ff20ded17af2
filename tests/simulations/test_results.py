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


def test_the_results_table_fits_100_columns_with_every_round_and_version_whole():
    from io import StringIO

    from rich.console import Console

    from fleetlora.simulations.report import results_table

    every_metric = {
        "train_loss": 0.9, "federated_eval_loss": 0.8, "federated_eval_accuracy": 0.6,
        "federated_eval_personal_accuracy": 0.7, "central_loss": 0.75, "central_accuracy": 0.61234,
    }  # fmt: skip
    rounds = [
        {"round": r, "version": f"v{r + 1}", "participants": 20, "examples": 12345, "metrics": every_metric,
         "upload_bytes": 123456, "package_bytes": 4096, "seconds": 192.4, "privacy": {"partition-1": 0.5 * r}}
        for r in (1, 2)
    ]  # fmt: skip
    rounds.append({**rounds[-1], "round": 3, "version": None, "seconds": 52.738902})
    results = {"initial": {"round": 0, "version": "v1", "metrics": every_metric}, "rounds": rounds}
    out = StringIO()
    Console(file=out, width=100).print(results_table(results, 100))
    lines = out.getvalue().splitlines()

    assert all(len(line) <= 100 for line in lines)
    header = next(line for line in lines if line.startswith("┃")).strip("┃").split("┃")
    rows = [line.strip("│").split("│") for line in lines if line.startswith("│")]
    assert all(len(row) == len(header) for row in rows)
    expected = [("0", "v1"), ("1", "v2"), ("2", "v3"), ("3", "failed")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == expected
    names = [h.strip() for h in header]
    assert {"test acc", "max ε", "time"} <= set(names) and "fed. loss" not in names  # least needed went first
    assert [r[names.index("time")].strip() for r in rows] == ["-", "3 min 12 s", "3 min 12 s", "52.7 s"]
