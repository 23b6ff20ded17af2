"""benchmarks/failover.py --smoke: one SIGKILL of the coordinator host under a running round is measured."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_the_failover_benchmark_kills_and_measures_one_restart(capsys, load_benchmark):
    benchmark = load_benchmark("failover")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    (kill,) = result["kills"]
    assert kill["status_after"] == "finished:completed" and kill["rounds_before"] == [0, 1]
    assert result["versions_lost"] == 0 and result["versions_doubled"] == 0
    assert 1.0 <= kill["superlink_seconds"] <= kill["devices_seconds"]
