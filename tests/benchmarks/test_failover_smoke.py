"""benchmarks/failover.py --smoke: one SIGKILL of the coordinator host under a running round is measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_failover_benchmark_kills_and_measures_one_restart(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("failover", REPO / "benchmarks" / "failover.py")
    assert spec and spec.loader
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)
    spec.loader.exec_module(benchmark)

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    (kill,) = result["kills"]
    assert kill["status_after"] == "finished:completed" and kill["rounds_before"] == [0, 1]
    assert result["versions_lost"] == 0 and result["versions_doubled"] == 0
    assert 1.0 <= kill["superlink_seconds"] <= kill["devices_seconds"]
