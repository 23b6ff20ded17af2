"""benchmarks/convergence.py --smoke: a federated arm and both references train and are scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a Simulation Engine start-up and three model builds


def test_the_convergence_benchmark_runs_an_arm_and_both_references(tmp_path: Path, capsys, load_benchmark):
    benchmark = load_benchmark("convergence")

    result = benchmark.main(
        ["--smoke", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    )

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert result["mode"] == "smoke" and result["complete"] and result["setup"]["model_name"] == "tiny"
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    arms = result["arms"]
    assert list(arms) == ["fedavg", "centralized", "local-only"]
    fedavg, centralized, local = arms["fedavg"], arms["centralized"], arms["local-only"]
    assert len(fedavg["accuracy"]) == 2 and len(fedavg["round_seconds"]) == 1  # round 0, then round 1
    assert fedavg["upload_bytes"] > 0 and fedavg["device_steps"] > 0 and fedavg["wall_seconds"] > 0
    assert len(centralized["accuracy"]) == 1 and centralized["device_steps"] > 0  # one epoch
    assert len(local["device_accuracy"]) == benchmark.LOCAL_ONLY_DEVICES and local["device_steps"] > 0
    for arm in arms.values():
        assert 0 <= arm["final_accuracy"] <= 1
    relative = result["final_accuracy_over_baseline"]  # no anchor arm: the centralized upper bound
    assert relative["baseline"] == "centralized"
    if centralized["final_accuracy"]:
        expected = round(fedavg["final_accuracy"] / centralized["final_accuracy"], 3)
        assert relative["ratios"] == {"fedavg": expected}
    assert benchmark.MODEL["name"] == "minilm"  # the smoke's tiny model is not left behind
