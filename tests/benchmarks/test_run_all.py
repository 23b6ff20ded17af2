"""benchmarks/run_all.py (``make bench``): what it runs, the headline it reads, and the README table."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.conftest import BENCHMARKS


def test_every_benchmark_is_run_and_has_a_headline(load_benchmark):
    run_all = load_benchmark("run_all")

    names = run_all.discover()

    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"run_all", "results_io"}  # no main in these two
    assert set(names) == scripts  # every other script has a main
    assert set(run_all.HEADLINES) == set(names)
    for name in names:
        assert "--quick" in (BENCHMARKS / f"{name}.py").read_text(), name


def test_a_row_reads_the_figure_the_baseline_and_the_ratio(tmp_path: Path, monkeypatch, load_benchmark):
    run_all = load_benchmark("run_all")
    monkeypatch.setattr(run_all, "QUICK", tmp_path)
    (tmp_path / "privacy_cost.json").write_text(
        json.dumps({"dp_step": {"dp_seconds": 0.6, "plain_seconds": 0.5, "ratio": 1.2},
                    "machine": {"cores": 2, "torch_threads": 2}})
    )  # fmt: skip
    (tmp_path / "forgetting.json").write_text(  # no ratio in the JSON: figure ÷ baseline
        json.dumps({"arms": {"replay, no DP": {"retention": 0.9}, "none, no DP": {"retention": 0.6}},
                    "machine": {"cpus": 2, "cores": 2, "torch_threads": 1}})
    )  # fmt: skip

    cost, forgetting = run_all.row("privacy_cost"), run_all.row("forgetting")

    assert cost[1].startswith("0.6 s") and cost[2].startswith("0.5 s") and cost[3] == "1.2×"
    assert cost[5] == "2 cores, 2 torch threads"
    assert forgetting[3] == "1.5×" and forgetting[5] == "2 cores, 1 torch threads"
    assert run_all.row("corpus")[1] == "no quick result yet"


def test_the_table_goes_between_markers_at_the_end_of_the_measured_section(load_benchmark):
    run_all = load_benchmark("run_all")
    readme = "# x\n\n## Measured\n\n| a |\n\nprose\n\n## Dependencies\n\nmore\n"

    once = run_all.update_readme(readme, "TABLE 1")
    twice = run_all.update_readme(once, "TABLE 2")

    assert once == readme.replace(
        "prose\n\n## Dep", f"prose\n\n{run_all.START}\nTABLE 1\n{run_all.END}\n\n## Dep"
    )
    assert twice == once.replace("TABLE 1", "TABLE 2")


def test_a_measured_section_at_the_end_of_the_readme_gets_the_table_too(load_benchmark):
    run_all = load_benchmark("run_all")
    readme = "## Measured\n\nprose\n"

    assert (
        run_all.update_readme(readme, "T") == f"## Measured\n\nprose\n\n{run_all.START}\nT\n{run_all.END}\n\n"
    )
