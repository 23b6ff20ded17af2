"""benchmarks/security_costs.py --smoke: the audit log's and encryption at rest's costs are measured."""

from __future__ import annotations

import json
from pathlib import Path


def test_the_security_costs_benchmark_measures_the_audit_log_and_sealing(
    tmp_path: Path, capsys, load_benchmark
):
    benchmark = load_benchmark("security_costs")

    result = benchmark.main(["--smoke", "--json", str(tmp_path / "r.json")])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    audit, at_rest = result["sqlite"]["audit"], result["sqlite"]["at_rest"]
    assert audit["entries"] == 200 and audit["append_per_second"] > 0 and audit["verify_per_second"] > 0
    assert audit["append_over_plain_insert"] > 0 and "postgresql" not in result
    assert (
        at_rest["versions"] == 5 and at_rest["sealed_over_clear_write"] > 0 and at_rest["adapter_bytes"] > 0
    )
