"""benchmarks/aggregation_attacks.py --smoke: every attack against every aggregator runs (tiny model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_attack_benchmark_runs_every_attack_against_every_aggregator(tmp_path: Path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "aggregation_attacks", REPO / "benchmarks" / "aggregation_attacks.py"
    )
    assert spec and spec.loader
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up
    spec.loader.exec_module(benchmark)

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
