"""benchmarks/dp_utility.py --smoke: every part of the DP measurement runs (tiny model, built-in corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_dp_utility_benchmark_runs_every_part(tmp_path: Path, capsys, load_benchmark):
    benchmark = load_benchmark("dp_utility")

    result = benchmark.main(
        ["--smoke", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    )

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert (tmp_path / "r.png").stat().st_size > 0
    assert set(result["federated"]) == {"2/round, ε=8", "2/round, no DP"}
    private, plain = result["federated"]["2/round, ε=8"], result["federated"]["2/round, no DP"]
    assert 0 < private["largest_epsilon"] <= 8 and plain["largest_epsilon"] == 0
    assert result["same_schedule_in_every_arm"] and private["partitions"] == plain["partitions"]
    assert all(len(arm["accuracy"]) == 3 for arm in result["federated"].values())  # round 0 and 2 rounds
    assert set(result["streaming"]) == {"record", "device"}
    assert all(arm["largest_epsilon"] <= 8 for arm in result["streaming"].values())
    assert set(result["references"]["pooled"]) == {"ε=8", "no DP"}
    assert result["cost"]["dp_over_plain"] > 0 and result["cost"]["peak_rss_mib"] > 0
