"""benchmarks/audit.py --smoke: the audit log's append and verify rates are measured against plain inserts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_audit_benchmark_measures_append_and_verify(tmp_path: Path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("audit_benchmark", REPO / "benchmarks" / "audit.py")
    assert spec and spec.loader
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)
    spec.loader.exec_module(benchmark)

    result = benchmark.main(["--smoke", "--json", str(tmp_path / "r.json")])

    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    sqlite = result["sqlite"]
    assert sqlite["entries"] == 200 and sqlite["append_per_second"] > 0 and sqlite["verify_per_second"] > 0
    assert sqlite["append_over_plain_insert"] > 0 and "postgresql" not in result
