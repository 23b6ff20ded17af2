"""benchmarks/device_resources.py --smoke: every section runs in its own process and reports its figures."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_the_device_resources_benchmark_measures_every_section(capsys, load_benchmark):
    benchmark = load_benchmark("device_resources")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    arms = result["training_memory"]["tiny"]
    off, on = arms["without_checkpointing"], arms["with_checkpointing"]
    assert off["steps"] == on["steps"] == 2 and off["loss"] == on["loss"]  # the same steps, recomputed
    assert 0 < on["estimate"]["activations"] < off["estimate"]["activations"]
    assert off["peak_mb"] >= off["rss_before_steps_mb"] > 0
    assert result["dp_with_checkpointing"]["ran"]
    load = result["adapter_load"]
    assert load["adapter_loaded"] and 0 < load["median_ms"] <= load["max_ms"]
    assert result["cold_load"]["tiny"]["build_model_seconds"] > 0
    pause = result["pause"]  # real psutil sensors against real busy processes
    assert (
        pause["paused"] and pause["steps"] == 300 and pause["paused_before_step"] > pause["spike_before_step"]
    )
    share = result["foreground_share"]
    assert share["alone"] > 0 and {"nice_0", "nice_10"} <= set(share)
    assert set(result["met"]) >= {"memory_reduction", "adapter_load_ms", "pause_within_one_step"}
