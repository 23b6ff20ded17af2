"""benchmarks/fleet_sizing.py --smoke: a real coordinator host with bare SuperNodes, and two simulations'
databases, each measured."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_the_sizing_benchmark_measures_a_superlink_with_bare_supernodes_and_database_growth(
    capsys, load_benchmark
):
    benchmark = load_benchmark("fleet_sizing")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    superlink = result["superlink"]
    assert superlink["failed_nodes"] == []
    idle, connected = superlink["levels"]
    assert idle["devices"] == 0 and idle["pulls_per_s"] == 0 and idle["pull_latency_ms"]["p50"] is None
    # 4 nodes pulling every 3 s (and some ms) over a 4 s window: at most twice each, through the terminator
    assert connected["devices"] == 4 and 0 < connected["pulls_per_s"] <= 8 / 4
    assert connected["connections"] >= 4 and connected["rss_mb"] > 50
    assert 0 < connected["pull_latency_ms"]["p50"] <= connected["pull_latency_ms"]["p95"]
    # back to back, the same nodes pull far more often than every 3 s
    assert superlink["burst"]["pulls_per_s"] > 2 * connected["pulls_per_s"]
    assert superlink["devices_at_burst_rate"] == round(3 * superlink["burst"]["pulls_per_s"])
    assert superlink["terminator_device_ceiling"] == round(
        superlink["terminator_max_connections"] / superlink["connections_per_device"]
    )
    assert superlink["superlink_db_bytes_per_registered_device"] > 0  # each registration is a stored row

    database = result["database"]
    tables = database["table_bytes"]  # K devices a round for R rounds, 2K for R, K for 2R (K 2, R 1)
    base, wide, long = tables["2x1"], tables["4x1"], tables["2x2"]
    # twice the devices a round: more participants and ledger rows, as many devices and packages
    assert wide["version_participants"] > base["version_participants"]
    assert wide["privacy_ledger"] > base["privacy_ledger"]
    assert wide["devices"] == base["devices"]
    # twice the rounds: another version and its packages
    assert long["model_versions"] > base["model_versions"]
    assert long["update_packages"] > base["update_packages"]
    assert database["bytes_per_round"] > database["adapter_bytes"] > 0
    assert database["bytes_per_device_round"] > 0
    assert database["bytes_per_device"] > 0 and database["package_bytes_per_round"] > 0
