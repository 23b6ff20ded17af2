"""benchmarks/forgetting.py --smoke: two arms of the class-incremental scenario run and are compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_forgetting_benchmark_runs_and_compares_its_arms(tmp_path: Path, capsys, load_benchmark):
    benchmark = load_benchmark("forgetting")

    result = benchmark.main(
        ["--smoke", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    )

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["arms"]) == {"none, no DP", "replay, no DP"}
    for arm in result["arms"].values():
        assert len(arm["seen_by_phase"]) == 2 and arm["failed_rounds"] == 0
        assert arm["retention"] is not None and arm["retention"] >= 0
        assert arm["distill_drop_points"] is not None and arm["largest_epsilon"] == 0
    assert result["comparison"]["replay, no DP"]["step_cost_over_none"] > 0
    assert (tmp_path / "r.png").stat().st_size > 10_000
