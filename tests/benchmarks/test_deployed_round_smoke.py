"""benchmarks/deployed_round.py --smoke: one round simulated and deployed cold and warm, each timed.

Its smallest real run: three fleets, two of them a real SuperLink with SuperNodes over TLS.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_the_deployed_round_benchmark_times_simulation_and_both_deployments(capsys, load_benchmark):
    benchmark = load_benchmark("deployed_round")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["mode"] == "smoke" and result["setup"]["rounds"] == 1
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    simulated = result["simulation"]
    assert len(simulated["round_seconds"]) == 1 and simulated["round_seconds"][0] > 0
    for name in ("cold", "warm"):
        arm = result["deployed"][name]
        assert arm["status"] == "finished:completed" and len(arm["round_seconds"]) == 1
        assert arm["round_seconds"][0] > 0 and arm["run_seconds"] >= arm["round_seconds"][0]
        assert arm["coordinator_cold_start_seconds"] > 0 and arm["devices_cold_start_seconds"] > 0
        assert arm["recovery_after_kill_seconds"] > 0
        steady = result["steady_round_seconds"]
        assert steady[name] == arm["round_seconds"][-1]
        expected = round(steady[name] / steady["simulation"], 2)
        assert result["ratio_deployed_over_simulated"][name] == expected
    assert result["warm_over_cold"] == round(
        result["steady_round_seconds"]["warm"] / result["steady_round_seconds"]["cold"], 3
    )
    # Each exchange of the round taken apart from the logs: the warm runner says when it took each task.
    for name in ("cold", "warm"):
        timeline = result["deployed"][name]["steady_round_exchanges"]
        assert {"train", "evaluate"} <= set(timeline)
        for kind in ("train", "evaluate"):
            assert set(timeline[kind]["devices"]) == {"device-1", "device-2"}
            assert 0 < timeline[kind]["all_in"] <= result["deployed"][name]["round_seconds"][0]
            for device in timeline[kind]["devices"].values():
                assert (device["taken"] is None) == (name == "cold")
                assert 0 <= device["started"] < device["replied"] <= timeline[kind]["all_in"]
    breakdown = result["overhead_breakdown"]
    assert breakdown["exchanges"] == ["train", "evaluate"]
    assert breakdown["gap_seconds"] == round(steady["warm"] - steady["simulation"], 3)
    parts = ("idle_poll_wait", "clientapp_start", "clientapp", "reply", "coordinator")
    assert sum(breakdown[f"{p}_seconds"] for p in parts) == pytest.approx(steady["warm"], abs=0.01)
