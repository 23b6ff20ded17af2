"""benchmarks/aggregation_attacks.py --smoke: every attack against every aggregator runs (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_attack_benchmark_runs_every_attack_against_every_aggregator(
    tmp_path: Path, capsys, load_benchmark
):
    benchmark = load_benchmark("aggregation_attacks")

    result = benchmark.main(["--smoke", "--json", str(tmp_path / "r.json")])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["arms"]) == {"mean", "trimmed-mean", "median"}
    expected = {"clean"} | {f"{attack} ×{n}" for attack in benchmark.ATTACKS for n in (1, 2)}
    for aggregator in result["arms"].values():
        assert set(aggregator["arms"]) == expected
        assert all(len(arm["accuracy"]) == 2 for arm in aggregator["arms"].values())
        # ×100 is far outside any round's norm bound: every scaled delta is dropped.
        assert aggregator["arms"]["scale ×2"]["dropped"] >= 2
    assert len(result["hostile_devices"]) == 2 and isinstance(result["default_meets_target"], bool)
