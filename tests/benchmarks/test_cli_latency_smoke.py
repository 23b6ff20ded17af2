"""benchmarks/cli_latency.py --smoke: each command it times ran as a process and answered."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_cli_latency_benchmark_times_help_and_listings(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("cli_latency", REPO / "benchmarks" / "cli_latency.py")
    assert spec and spec.loader
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)
    spec.loader.exec_module(benchmark)

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    commands = result["commands"]
    assert {c["kind"] for c in commands.values()} == {"help", "listing"}
    assert result["failed"] == []
    assert all(c["exit_codes"] == [0] and c["median_s"] > 0 for c in commands.values())
    status = commands["fleetlora coordinator status --config CONFIG"]  # timed apart from its flwr calls
    assert status["flwr_s"] > 0 and status["ours_s"] > 0
    assert all(seconds > 0 for seconds in result["setup_s"].values())
