"""benchmarks/corpus.py --smoke: the real ingest agent under paced load, dedup scoring, cold-tier archive."""

from __future__ import annotations

import json


def test_the_corpus_benchmark_measures_ingest_dedup_and_compression(capsys, load_benchmark):
    benchmark = load_benchmark("corpus")

    result = benchmark.main(["--smoke"])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["mode"] == "smoke" and result["data"] == "builtin"
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch_threads"] >= 1
    ingest = result["ingest"]
    smoke = benchmark.SMOKE
    assert ingest["records"] == int(smoke["rate"] * smoke["seconds"]) == ingest["answers_201"]
    latency = ingest["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert result["ingest_p99_ms"] == latency["p99"] and ingest["achieved_rate_per_s"] > 0
    memory = result["memory"]
    assert 0 < memory["rss_after_start_mb"] <= memory["vm_hwm_mb"] and 0 < result["agent_rss_share"] < 1
    assert memory["rss_corpus_only_mb"] > 0
    dedup = result["dedup"]
    assert (dedup["originals"], dedup["duplicates"]) == (smoke["originals"], smoke["duplicates"])
    assert set(result["dedup_precision_recall"]) == {str(t) for t in benchmark.THRESHOLDS}
    for precision, recall in result["dedup_precision_recall"].values():
        assert 0 <= precision <= 1 and 0 < recall <= 1
    compression = result["compression"]
    assert compression["archived"] == compression["distinct_texts"] > 0 and compression["cold_blocks"] > 0
    assert 0 < compression["compression_saved"] < 1 and compression["verify_damaged_blocks"] == []
    assert compression["window_intact"] and compression["content_hashes_intact"]
