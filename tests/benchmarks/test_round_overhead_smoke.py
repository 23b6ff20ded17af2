"""benchmarks/round_overhead.py --smoke (2 rounds, 2 steps, 2 devices): both arms do the same work
and are timed.

Run as ``make bench`` runs it, in its own process: its Ray workers import the script's apps by value
only when it is ``__main__``, and Ray's start-up and shut-down stay out of the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.benchmarks.conftest import BENCHMARKS

pytestmark = pytest.mark.slow  # two Ray start-ups


def test_the_round_overhead_benchmark_times_both_arms_on_the_same_work():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "round_overhead.py"), "--smoke"],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # "would not do the same work" exits non-zero

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "round_overhead" and result["mode"] == "smoke"
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert (result["rounds"], result["devices"], result["local_steps"]) == (2, 2, 2)
    for arm in ("bare_flower", "fleetlora"):
        assert result[f"{arm}_seconds"] > 0 and len(result[f"{arm}_round_seconds_each"]) == 2
        assert all(s > 0 for s in result[f"{arm}_round_seconds_each"])
        assert result[f"{arm}_later_round_seconds"] > 0
    assert result["ratio"] == round(result["fleetlora_seconds"] / result["bare_flower_seconds"], 3)
    assert result["round_ratio"] > 0
    assert set(result["arms"]) == {"bare_flower", "fleetlora"} and "no DP" in result["notes"]
