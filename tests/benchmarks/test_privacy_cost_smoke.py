"""benchmarks/privacy_cost.py --smoke: a DP step against a plain one, sealing against a local round."""

from __future__ import annotations

import json

import pytest


def test_the_privacy_cost_benchmark_times_dp_and_sealing(capsys, load_benchmark):
    benchmark = load_benchmark("privacy_cost")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["repeats"] == benchmark.SMOKE_REPEATS and result["model"].startswith("tiny")
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    step = result["dp_step"]
    assert step["plain_seconds"] > 0 and step["dp_seconds"] > 0
    assert step["ratio"] == pytest.approx(step["dp_seconds"] / step["plain_seconds"], rel=0.01, abs=0.002)
    crypto = result["crypto"]
    assert crypto["delta_bytes"] > 0 and crypto["local_round_seconds"] > 0
    assert set(crypto["by_upload_codec"]) == {"fp32+zstd", "int8+zstd"}
    for upload in crypto["by_upload_codec"].values():
        assert upload["sealed_bytes"] > 0 and upload["share_of_round"] > 0
        assert upload["encode_and_seal_seconds"] > 0 and upload["open_and_decode_seconds"] > 0
    assert crypto["share_of_round"] == crypto["by_upload_codec"]["fp32+zstd"]["share_of_round"]
