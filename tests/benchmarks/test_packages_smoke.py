"""benchmarks/packages.py --smoke: codecs, the builder's choice, device applies and crash recovery."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # the recovery part starts two fresh Pythons


def test_the_packages_benchmark_measures_every_part(capsys, load_benchmark):
    benchmark = load_benchmark("packages")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["mode"] == "smoke" and result["sanity_problems"] == []
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    (only,) = result["results"]
    assert (only["model"], only["rank"]) == ("tiny", 2) and only["adapter_bytes"] > 0
    ladder = [c.name for c in benchmark.LADDER]
    for kind in ("full", "delta"):
        rows = only["codecs"][kind]
        assert [r["codec"] for r in rows] == ladder
        assert all(r["package_bytes"] > r["payload_bytes"] > 0 for r in rows)
    assert "refused" not in only["chosen"]["cap 0.1"]["delta"]
    apply = only["apply"]
    assert apply["apply_delta_seconds"] > 0 and apply["baseline_delta_seconds"] > 0
    ratio = apply["apply_delta_seconds"] / apply["baseline_delta_seconds"]  # of the unrounded medians
    assert apply["delta_over_baseline"] == pytest.approx(ratio, rel=0.1)
    recovery = only["recovery"]
    assert recovery["killed_returncode"] == -9 and recovery["back_on_a_exactly"]
    assert recovery["delta_applies_after_recovery"] and recovery["recovery_seconds"] > 0
    headline = result["headline"]
    assert headline["apply_delta_seconds"] == apply["apply_delta_seconds"]
    assert headline["recovery_seconds_worst"] == recovery["recovery_seconds"]
