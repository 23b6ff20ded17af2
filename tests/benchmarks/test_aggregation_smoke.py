"""benchmarks/aggregation.py --smoke: sealed uploads folded in fresh processes, memory and speed measured."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # three fresh Pythons, each importing torch and Flower


def test_the_aggregation_benchmark_folds_every_sealed_reply_and_measures_it(capsys, load_benchmark):
    benchmark = load_benchmark("aggregation")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["model"] == "tiny" and result["adapter_bytes"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert set(result["n"]) == {"20", "60"}
    for count, run in result["n"].items():
        assert run["accepted"] == int(count) and run["drop_reasons"] == []
        assert run["seconds"] > 0 and run["deltas_per_s"] > 0 and run["bytes_per_s"] > 0
        assert run["peak_mb"] > 0 and run["aggregation_mb"] >= 0 and run["release_finite"]
        assert run["aes_gcm_bytes_per_s"] > 0 and run["throughput_ratio_vs_aes_gcm"] > 0
        assert run["release_error_vs_base"] < 0.5  # the mean of base + noise is near the base
    assert result["peak_ratio_60_vs_20"] > 0 and result["throughput_ratio_vs_aes_gcm"] > 0
    assert result["aes_gcm_bytes_per_s"] > 0 and set(result["met"]) >= set(result["targets"])
    assert result["met"]["every_reply_accepted"]
    stages = result["stages"]["median_ms_per_reply"]
    assert stages["Ed25519 signature check"] > 0 and result["stages"]["aggregator_add_ms"] > 0
    assert "finite check" not in stages  # read off the L2 norm: no step of its own
    ceiling = result["ceiling"]
    assert ceiling["steps_kept"] == [
        "Ed25519 signature check",
        "HPKE decryption (X25519, HKDF, AES-256-GCM)",
        "zstd decompression (bounded)",
    ]
    assert 0 < ceiling["ratio_vs_aes_gcm"] < 1 and ceiling["steps_kept_ms"] > 0
    assert ceiling["target_reachable"] == (
        ceiling["ratio_vs_aes_gcm"] >= result["targets"]["throughput_ratio_vs_aes_gcm"]
    )
    assert "ceiling" not in result["stages"] and result["stages"]["throughput_ratio_vs_aes_gcm"] > 0
    assert "holding_configurations" not in result  # nothing but the streaming path in a smoke run
