"""benchmarks/cli_latency.py --smoke: each command it times ran as a process and answered."""

from __future__ import annotations

import json


def test_the_cli_latency_benchmark_times_help_and_listings(capsys, load_benchmark):
    benchmark = load_benchmark("cli_latency")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    commands = result["commands"]
    assert {c["kind"] for c in commands.values()} == {"help", "listing"}
    assert result["failed"] == []
    assert all(c["exit_codes"] == [0] and c["median_s"] > 0 for c in commands.values())
    status = commands["fleetlora coordinator status --config CONFIG"]  # timed apart from its flwr calls
    assert status["flwr_s"] > 0 and status["ours_s"] > 0
    assert all(seconds > 0 for seconds in result["setup_s"].values())
